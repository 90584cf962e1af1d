"""The command line: help, Hydra's --cfg, dry runs, and one-line errors for bad overrides."""

import pytest

from run_helpers import run_cli


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["trainer.max_stpes=5"], ["trainer.max_stpes", "did you mean trainer.max_steps", "valid keys under trainer"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps", "abc"]),
    (["model=gpt-17"], ["model=gpt-17", "valid choices", "tiny-llama"]),
    (["recipe=nope"], ["recipe=nope", "lora-llm"]),
    (["optim.scheduler=step"], ["optim.scheduler", "cosine"]),
    (["data=chat"], ["data.path", "required"]),
    (["unknown_top=1"], ["unknown_top", "valid keys at the top level"]),
    (["peft.r=0"], ["peft.r"]),
])
def test_bad_overrides_fail_with_one_line(args, needles):
    proc = run_cli(["recipe=lora-llm", *args], timeout=120)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2


def test_help_and_cfg_job():
    proc = run_cli(["--help"], timeout=120)
    assert proc.returncode == 0 and "recipe" in proc.stdout
    proc = run_cli(["recipe=lora-llm", "optim.lr=0.01", "--cfg", "job"], timeout=120)
    assert proc.returncode == 0
    assert "lr: 0.01" in proc.stdout and "name_or_path: builtin:tiny-llama" in proc.stdout


def test_dry_run_prints_the_plan_without_training(tmp_path):
    proc = run_cli(["recipe=lora-llm", "dry_run=true", f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    for needle in ["parameters", "trainable", "global batch", "steps per epoch", "total steps",
                   "peak memory (est.)", "tokens"]:
        assert needle in proc.stdout, needle
    assert not (tmp_path / "run").exists()


def test_dry_run_of_pairs_counts_both_sequences_of_a_row(tmp_path):
    proc = run_cli(["recipe=dpo-llm", "dry_run=true", "trainer.micro_batch_size=8", "trainer.grad_accum=2",
                    "data.max_seq_len=256", f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if "global batch" in x]
    assert "16 rows = 1 x 8 x 2" in line and f"up to {16 * 2 * 256:,} tokens" in line, line
    assert "2 sequences of up to data.max_seq_len per row" in line, line


def test_missing_data_file_is_one_line(tmp_path):
    proc = run_cli(["recipe=lora-llm", f"data.path={tmp_path / 'missing.jsonl'}",
                    f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert_one_line_error(proc, "missing.jsonl")


def test_hub_model_offline_names_the_offline_option(tmp_path):
    proc = run_cli(["recipe=lora-llm", "model=qwen2.5-0.5b", f"output_dir={tmp_path / 'run'}"],
                   timeout=300, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "Qwen/Qwen2.5-0.5B-Instruct", "model=tiny-llama")


def test_qlora_on_cpu_fails_early_with_a_clear_message(tmp_path):
    proc = run_cli(["recipe=qlora-llm", f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert_one_line_error(proc, "load_in_4bit", "CUDA")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_flex_attention_on_cpu_fails_early_with_a_clear_message(tmp_path):
    proc = run_cli(["recipe=lora-llm", "model.attn_implementation=flex_attention",
                    f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert_one_line_error(proc, "flex_attention", "CUDA", "model.attn_implementation=sdpa")


def test_every_problem_of_an_override_set_is_reported_together(tmp_path):
    """Three bad overrides (an unknown key, a bad choice, a bad export dtype): three lines, exit 2,
    before anything is built (export.dtype is checked up front, not after training)."""
    proc = run_cli(["recipe=lora-llm", "trainer.bogus=1", "data.format=nope", "export.dtype=bogus",
                    f"output_dir={tmp_path / 'run'}"], timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), proc.stderr
    text = "\n".join(lines)
    assert "trainer.bogus" in text and "data.format='nope'" in text and "export.dtype='bogus'" in text
    assert not (tmp_path / "run").exists()


def test_export_dtype_is_refused_before_training(tmp_path):
    proc = run_cli(["recipe=lora-llm", "export.merge=true", "export.dtype=float8",
                    f"output_dir={tmp_path / 'run'}"], timeout=120)
    assert_one_line_error(proc, "export.dtype", "float32, bfloat16, float16")
    assert not (tmp_path / "run").exists()
