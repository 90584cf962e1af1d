"""Greedy exact match: the scoring rule on hand-made cases, its line, and a (short) default run
that leaves loss_curves.png, report.md and the exact-match line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import run_cli
from run_helpers import build_trainer

from finetune.data.sample import make_sample
from finetune.outputs.exact_match import exact_match_line, exact_matches, read_result, record, score
from finetune.outputs.report import write_report
from finetune.tasks.causal_lm import greedy_rows


@pytest.mark.parametrize("completion,reference,hit", [
    ("ENGINE", "ENGINE", True),
    ("  ENGINE\n", "ENGINE", True),        # surrounding whitespace is stripped
    ("ENGINE", " ENGINE \n\t", True),
    ("EN GINE", "ENGINE", False),          # inner whitespace is kept
    ("engine", "ENGINE", False),           # case is compared
    ("ENGINE.", "ENGINE", False),          # punctuation is compared
    ("ENGINEENGINE", "ENGINE", False),     # no prefix credit
    ("", "", True),
    ("", "x", False),
])
def test_exact_match_strips_then_compares_exactly(completion, reference, hit):
    assert exact_matches([completion], [reference]) == int(hit)


def test_exact_match_counts_and_refuses_unequal_lists():
    assert exact_matches(["a", "b ", "c"], ["a", "b", "d"]) == 2
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        exact_matches(["a", "b"], ["a"])


def test_score_keeps_the_misses_and_the_line_reads_as_a_person_would_say_it():
    rows = [{"prompt": f"p{i}", "completion": "x" if i % 4 else "y", "reference": "x"} for i in range(8)]
    result = score(rows)
    assert (result["hits"], result["n"]) == (6, 8)
    assert [m["prompt"] for m in result["misses"]] == ["p0", "p4"]
    assert exact_match_line({"hits": 0, "n": 50}, {"hits": 46, "n": 50}) == \
        "Greedy exact match on 50 held-out prompts: before 0/50 (0%), after 46/50 (92%)"
    assert exact_match_line(None, {"hits": 1, "n": 3}) == \
        "Greedy exact match on 3 held-out prompts: before -, after 1/3 (33%)"


def test_report_carries_the_line(tmp_path):
    record(tmp_path, "before", {"hits": 1, "n": 4})
    record(tmp_path, "after", {"hits": 3, "n": 4})
    assert read_result(tmp_path) == {"before": {"hits": 1, "n": 4}, "after": {"hits": 3, "n": 4}}
    record(tmp_path, "before", {"hits": 0, "n": 4})  # a new run starts the file afresh
    assert read_result(tmp_path) == {"before": {"hits": 0, "n": 4}}
    record(tmp_path, "after", {"hits": 2, "n": 4})
    text = write_report(tmp_path, {"recipe": "lora-llm"}).read_text()
    assert "Greedy exact match on 4 held-out prompts: before 0/4 (0%), after 2/4 (50%)" in text


def test_short_default_run_leaves_curves_report_and_exact_match(tmp_path):
    """The default recipe's code path (recipe=lora-llm, only shorter and on fewer prompts)."""
    out = tmp_path / "run"
    proc = run_cli("recipe=lora-llm", "trainer.max_steps=12", "trainer.eval_steps=0",
                   "trainer.exact_match_prompts=6", f"output_dir={out}", cache_dir=tmp_path / "cache",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Greedy exact match on 6 held-out prompts"))
    result = json.loads((out / "exact_match.json").read_text())
    assert result["before"]["n"] == result["after"]["n"] == 6
    assert line == exact_match_line(result["before"], result["after"])
    assert line in (out / "report.md").read_text()
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_left_padded_batches_generate_what_one_prompt_at_a_time_does(tmp_path):
    trainer = build_trainer(["recipe=lora-llm", "trainer.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}"],
                            tmp_path / "run")
    one = greedy_rows(trainer, 7, exact=True, batch_size=1)
    batched = greedy_rows(trainer, 7, exact=True, batch_size=7)
    assert len({len(r["prompt"]) for r in one}) > 1  # prompts of several lengths: padding is exercised
    assert [r["completion"] for r in batched] == [r["completion"] for r in one]


def test_shipped_sample_files_are_what_make_sample_writes_and_held_out_words_are_unseen(tmp_path):
    make_sample.main(tmp_path)
    shipped = Path(make_sample.__file__).parent
    for path in sorted(tmp_path.glob("*.jsonl")):
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
    rows = lambda name: [json.loads(x) for x in (shipped / name).read_text().splitlines()]  # noqa: E731
    train_words = {r["input"] for r in rows("instructions-train.jsonl")}
    held = rows("instructions-eval.jsonl")
    assert len(held) == 100 and not train_words & {r["input"] for r in held}
    assert {r["instruction"] for r in held} == set(make_sample.FIRST_RUN_TASKS)


def test_dpo_scores_the_chosen_answer_and_reports_reward_accuracy(tmp_path):
    """recipe=dpo-llm: the held-out prompts answered greedily are the pairs' prompts, the reference is
    the chosen text (not chosen + rejected); the end line and report.md carry the held-out reward
    accuracy; samples.jsonl the greedy answers. A scorer (reward-llm) refuses exact match in one line."""
    out = tmp_path / "dpo"
    proc = run_cli("recipe=dpo-llm", "trainer.max_steps=4", "trainer.eval_steps=0", "trainer.micro_batch_size=4",
                   "trainer.exact_match_prompts=5", "trainer.eval_max_batches=2", f"output_dir={out}",
                   cache_dir=tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pairs = [json.loads(x) for x in (Path(make_sample.__file__).parent / "preference-eval.jsonl").read_text().splitlines()]
    result = json.loads((out / "exact_match.json").read_text())
    assert result["before"]["n"] == result["after"]["n"] == 5
    for miss in result["after"]["misses"]:
        pair = next(p for p in pairs if miss["prompt"].find(p["prompt"]) >= 0)
        assert miss["reference"] == pair["chosen"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [p["chosen"] for p in pairs[:len(samples)]] and samples
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    assert f"held-out reward accuracy {summary['eval_reward_accuracy']:.3f}" in proc.stdout + proc.stderr
    assert "eval_reward_accuracy" in (out / "report.md").read_text()
    from PIL import Image

    with Image.open(out / "loss_curves.png") as img:  # loss, lr and the reward panel (margin, accuracy)
        assert img.size[0] == 1500
    bad = run_cli("recipe=reward-llm", "trainer.exact_match_prompts=5", "trainer.max_steps=1",
                  f"output_dir={tmp_path / 'rm'}", cache_dir=tmp_path / "cache", timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr
    assert "trainer.exact_match_prompts=5 is not available for model.task=reward" in lines[0]
