"""Preference tuning (model.task=dpo): each loss equals its formula in float64, the task's loss on a
real tiny model equals a direct computation, accumulation equals one big batch, the LoRA reference
(adapter disabled) equals a frozen copy, per-step figures match TRL's DPOTrainer, bad rows are one
line naming file:line, and a CLI run resumes bit for bit."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil

import pytest
import torch

from model_helpers import direct_logps, perturb
from run_helpers import build_trainer, compose, run_cli, train_losses, read_metrics
from finetune.data.sample.make_sample import instruction_rows, preference_rows
from finetune.data.tokenize import IGNORE
from finetune.tasks.preference import LOSSES, preference_losses


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def reference_loss(loss, beta, pc, pr, rc, rr, lc, lr, ls, gamma, lam):
    """Each loss written out from its paper's formula, on Python floats (float64)."""
    d = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)
    if loss == "robust":
        return (-(1 - ls) * logsig(beta * d) + ls * logsig(-beta * d)) / (1 - 2 * ls)
    if loss == "hinge":
        return max(0.0, 1 - beta * d)
    if loss == "ipo":
        return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    if loss == "simpo":
        z = beta * (pc / lc - pr / lr) - gamma
        return -(1 - ls) * logsig(z) - ls * logsig(-z)
    if loss == "orpo":
        ac, ar = pc / lc, pr / lr
        log_odds = (ac - math.log1p(-math.exp(ac))) - (ar - math.log1p(-math.exp(ar)))
        return -ac - lam * logsig(log_odds)
    raise AssertionError(loss)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_each_loss_equals_its_float64_formula(loss, ls):
    if ls and loss in ("hinge", "ipo", "orpo"):
        pytest.skip("no label smoothing in this loss")
    g = torch.Generator().manual_seed(0)
    n = 16
    lc, lr = torch.randint(1, 30, (n,), generator=g).double(), torch.randint(1, 30, (n,), generator=g).double()
    pc, pr = -lc * torch.rand(n, generator=g, dtype=torch.float64) * 3, -lr * torch.rand(n, generator=g,
                                                                                            dtype=torch.float64) * 3
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g,
                                                                                      dtype=torch.float64)
    beta, gamma, lam = 0.3, 0.7, 0.25
    got, chosen_r, rejected_r = preference_losses(loss, beta, pc, pr, rc, rr, lc, lr, label_smoothing=ls,
                                                  gamma=gamma, orpo_lambda=lam)
    for i in range(n):
        want = reference_loss(loss, beta, *(float(t[i]) for t in (pc, pr, rc, rr, lc, lr)), ls, gamma, lam)
        assert abs(float(got[i]) - want) < 1e-12, (loss, i)
    if loss in ("simpo", "orpo"):  # no reference: rewards are beta * the average log-prob
        assert torch.allclose(chosen_r, beta * pc / lc) and torch.allclose(rejected_r, beta * pr / lr)
    else:
        assert torch.allclose(chosen_r, beta * (pc - rc)) and torch.allclose(rejected_r, beta * (pr - rr))


# ----------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = preference_rows(instruction_rows(random.Random(7), 64), random.Random(8))
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(pairs_file, *extra):
    # plain DPO, no exact match: what these tests were written on (the recipe adds pref.rpo_alpha=1.0)
    return ["recipe=dpo-llm", "pref.rpo_alpha=0", "trainer.exact_match_prompts=0",
            f"data.path={pairs_file}", "data.eval_split=null", "data.eval_size=0",
            "trainer.sample_prompts=0", *extra]


def _pair_sequences(trainer, i):
    row = trainer.data.train[i]
    k = row["class_label"]
    return (row["input_ids"][:k].tolist(), row["labels"][:k].tolist()), \
        (row["input_ids"][k:].tolist(), row["labels"][k:].tolist())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo", "orpo-pair", "sigmoid-rpo", "ipo-rpo"])
def test_task_loss_equals_direct_computation(tmp_path, pairs_file, loss):
    """ORPO's SFT term: per chosen token of the batch (pref.orpo_sft=token, the default, as TRL) or
    per pair (orpo-pair: pref.orpo_sft=pair); the odds-ratio term is per pair either way. -rpo:
    pref.rpo_alpha=0.5, half the batch's NLL per chosen token added to the DPO loss."""
    loss, _, sft = loss.partition("-")
    rpo = 0.5 if sft == "rpo" else 0.0
    trainer = build_trainer(_overrides(pairs_file, f"pref.loss={loss}", "pref.label_smoothing=0.1"
                                       if loss == "sigmoid" else "pref.label_smoothing=0.0",
                                       f"pref.orpo_sft={'pair' if sft == 'pair' else 'token'}",
                                       f"pref.rpo_alpha={rpo}"), tmp_path / "run")
    model = trainer.acc.unwrap_model(trainer.model)
    perturb(model)
    model.eval()
    rows = [0, 3, 7, 11]
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    assert batch["input_ids"].shape[0] == 8 and "attention_mask" in batch  # chosen x4 then rejected x4
    with torch.no_grad():
        got = float(trainer.task.loss_sum(model, batch))
        p, want, nll, tokens = trainer.cfg.pref, 0.0, 0.0, 0
        for i in rows:
            (c_ids, c_lab), (r_ids, r_lab) = _pair_sequences(trainer, i)
            assert c_lab[-1] != IGNORE and c_ids[-1] == trainer.tokenizer.eos_token_id  # ends with <|end|>
            pc, pr = direct_logps(model, c_ids, c_lab), direct_logps(model, r_ids, r_lab)
            with model.disable_adapter():
                rc, rr = direct_logps(model, c_ids, c_lab), direct_logps(model, r_ids, r_lab)
            lc, lr = sum(x != IGNORE for x in c_lab), sum(x != IGNORE for x in r_lab)
            want += reference_loss(loss, p.beta, pc, pr, rc, rr, lc, lr, p.label_smoothing, p.gamma, p.orpo_lambda)
            if loss == "orpo" and not sft:  # the per-pair SFT term out, the per-token one added below
                want += pc / lc
                nll, tokens = nll - pc, tokens + lc
            if rpo:
                nll, tokens = nll - pc, tokens + lc
        if tokens:  # summed over pairs, divided by pairs: the mean per token
            want += (rpo or 1.0) * len(rows) * nll / tokens
    assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)


def _one_step(tmp_path, pairs_file, name, micro, accum, rows, extra=()):
    trainer = build_trainer(_overrides(pairs_file, f"trainer.micro_batch_size={micro}",
                                       f"trainer.grad_accum={accum}", *extra), tmp_path / name)
    model = trainer.acc.unwrap_model(trainer.model)
    perturb(model)
    batches = [trainer.collate([trainer.data.train[i] for i in rows[k * micro:(k + 1) * micro]])
               for k in range(accum)]
    loss = trainer.accumulate_gradients(batches, sum(trainer.task.count_targets(b) for b in batches))
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [(), ("peft=none",), ("pref.loss=orpo",), ("pref.rpo_alpha=1.0",)],
                         ids=["lora", "full", "orpo-token", "rpo"])
def test_accumulation_2x4_equals_1x8(tmp_path, pairs_file, extra):
    rows = [0, 5, 17, 42, 9, 23, 31, 60]  # pairs of uneven lengths
    big_loss, big = _one_step(tmp_path, pairs_file, "big", 8, 1, rows, extra)
    small_loss, small = _one_step(tmp_path, pairs_file, "small", 4, 2, rows, extra)
    assert abs(big_loss - small_loss) < 1e-5 and abs(big_loss - math.log(2)) > 1e-3
    assert big.keys() == small.keys()
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name


def test_lora_reference_equals_frozen_copy(tmp_path, pairs_file):
    lora = build_trainer(_overrides(pairs_file), tmp_path / "lora")
    full = build_trainer(_overrides(pairs_file, "peft=none"), tmp_path / "full")
    assert lora.task.ref_model is None and full.task.ref_model is not None  # no second copy with LoRA
    perturb(lora.acc.unwrap_model(lora.model))  # LoRA weights and the fully trained embeddings / head
    perturb(full.acc.unwrap_model(full.model))
    batch = lora.collate([lora.data.train[i] for i in range(6)])
    with torch.no_grad():
        via_adapter = lora.task.reference_logps(lora.model, batch)
        via_copy = full.task.reference_logps(full.model, batch)
        policy = lora.task.pair_outputs(lora.model, batch)[3]
    assert torch.allclose(via_adapter, via_copy, atol=1e-5)
    assert not torch.allclose(policy, via_adapter, atol=1e-3)  # the policy did move


@pytest.mark.parametrize("extra", [(), ("peft=none",)], ids=["lora", "full"])
def test_precomputed_reference_equals_on_the_fly(tmp_path, pairs_file, extra):
    common = _overrides(pairs_file, "trainer.micro_batch_size=4", "data.eval_size=6", *extra)
    live = build_trainer(common, tmp_path / "live")
    pre = build_trainer([*common, "pref.precompute_ref=true"], tmp_path / "pre")
    files = list(pre.data.cache_dir.glob("reference-logps-*.safetensors"))
    assert len(files) == 1 and pre.task.ref_model is None  # full: the frozen copy is dropped
    table = pre.task.ref_table
    assert table["train"].shape == (len(pre.data.train), 2) and table["eval"].shape == (6, 2)
    rows = [0, 5, 17, 42]
    batch = live.collate([live.data.train[i] for i in rows])
    with torch.no_grad():
        want = live.task.reference_logps(live.model, batch)
    assert torch.allclose(table["train"][rows].T.reshape(-1), want, atol=1e-5)
    for trainer in (live, pre):
        perturb(trainer.acc.unwrap_model(trainer.model))
    grads, losses = [], []
    for trainer in (live, pre):
        batch = {**trainer.collate([trainer.data.train[i] for i in rows]), "row_ids": rows}
        losses.append(float(trainer.accumulate_gradients([batch], 4)))
        grads.append({n: p.grad for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters()
                      if p.requires_grad})
    assert abs(losses[0] - losses[1]) < 1e-6 and abs(losses[0] - math.log(2)) > 1e-3
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name
    a, b = live.evaluate(), pre.evaluate()
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a if k != "step")
    # The same data and weights read the cached table; another reference (an SFT adapter) is another key.
    again = build_trainer([*common, "pref.precompute_ref=true"], tmp_path / "again")
    assert again.task.ref_key == pre.task.ref_key and torch.equal(again.task.ref_table["train"], table["train"])


def test_config_problems_are_reported():
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["recipe=dpo-llm", "pref.loss=nope", "pref.beta=0", "pref.label_smoothing=0.5"])
    text = str(err.value)
    assert "pref.loss=nope" in text and "pref.beta=0" in text and "pref.label_smoothing=0.5" in text
    with pytest.raises(ConfigError, match="does not fit data.format=alpaca"):
        compose(["recipe=dpo-llm", "data=sample"])


# ----------------------------------------------------------------------------- data
def _preprocess(tmp_path, path, *extra):
    return run_cli(["recipe=dpo-llm", "stage=preprocess", f"data.path={path}", "data.eval_split=null",
                    "data.eval_size=0", f"output_dir={tmp_path / 'run'}", *extra],
                   env={"FINETUNE_CACHE": str(tmp_path / "cache")})


GOOD = {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}
BAD = {
    "missing-chosen": ({"prompt": "x", "rejected": "y"}, "missing field 'chosen'"),
    "empty-rejected": ({"prompt": "x", "chosen": "y", "rejected": "  "}, "field 'rejected' is empty"),
    "identical": ({"prompt": "x", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are identical"),
    "wrong-type": ({"prompt": "x", "chosen": 3, "rejected": "y"}, "field 'chosen' must be a string"),
    "user-completion": ({"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"},
                        "field 'chosen': message 0 must be an assistant message"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_pair_is_one_line_naming_file_line(tmp_path, case):
    row, expected = BAD[case]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    result = _preprocess(tmp_path, path)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pairs.jsonl:2: {expected}" in lines[0], result.stderr


def test_layouts_and_skip_counts(tmp_path):
    rows = [GOOD,
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": {"role": "assistant", "content": "b"}},
            {"conversations": [{"from": "human", "value": "q2"}], "chosen": {"from": "gpt", "value": "yes"},
             "rejected": {"from": "gpt", "value": "no"}},
            BAD["identical"][0], BAD["missing-chosen"][0]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from finetune.data import prepare_data
    from finetune.model.builtin import tiny_chat_tokenizer

    cfg = compose(["recipe=dpo-llm", f"data.path={path}", "data.eval_split=null", "data.eval_size=0",
                   "data.on_bad_example=skip"])
    data = prepare_data(cfg, tiny_chat_tokenizer())
    stats = data.stats["train"]
    assert stats["kept"] == 3 and stats["skipped_bad"] == 2 and stats["read"] == 5
    tok = tiny_chat_tokenizer()
    texts = [(tok.decode(r["input_ids"][:r["class_label"]]), tok.decode(r["input_ids"][r["class_label"]:]))
             for r in (data.train[i] for i in range(3))]
    assert texts[1] == ("<|system|>be brief<|end|><|user|>q<|end|><|assistant|>a<|end|>",
                        "<|system|>be brief<|end|><|user|>q<|end|><|assistant|>b<|end|>")
    assert texts[2][0].endswith("<|user|>q2<|end|><|assistant|>yes<|end|>")


def test_truncation_cuts_the_prompt_from_the_left_first():
    from finetune.tasks.preference import fit_pair

    prompt = list(range(10, 30))
    chosen = (prompt + [1, 2, 3], [IGNORE] * 20 + [1, 2, 3])
    rejected = (prompt + [4, 5], [IGNORE] * 20 + [4, 5])
    (ci, cl), (ri, rl) = fit_pair(chosen, rejected, 8)
    assert ci == [25, 26, 27, 28, 29, 1, 2, 3] and ri == [25, 26, 27, 28, 29, 4, 5]
    assert cl == [IGNORE] * 5 + [1, 2, 3] and rl == [IGNORE] * 5 + [4, 5]
    long_c = (prompt[:3] + list(range(100, 110)), [IGNORE] * 3 + list(range(100, 110)))
    (ci, cl), _ = fit_pair(long_c, rejected, 6)  # the completion alone is too long: keeps its end token
    assert ci == [12, 100, 101, 102, 103, 109] and cl[0] == IGNORE


# ----------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0])
def test_per_step_loss_and_rewards_match_trl(tmp_path, pairs_file, rpo_alpha):
    """Full fine-tuning, 8 pairs = one batch per step (so the order of rows plays no part), sigmoid,
    beta 0.1, AdamW lr 1e-3 constant, no warmup / weight decay, clip 1.0: TRL's defaults differ in
    lr (1e-6), schedule (linear) and max_length (1024; no pair here reaches it). pref.rpo_alpha
    (the recipe's 1.0) is TRL's loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()][:8]
    path = tmp_path / "eight.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 3
    ours = build_trainer(["recipe=dpo-llm", "peft=none", f"pref.rpo_alpha={rpo_alpha}", f"data.path={path}",
                          "data.eval_split=null", "data.eval_size=0", "trainer.sample_prompts=0", "trainer.micro_batch_size=8",
                          f"trainer.max_steps={steps}", "trainer.log_steps=1", "trainer.eval_steps=0",
                          "trainer.save_steps=0", "optim.lr=1e-3", "optim.warmup_steps=0",
                          "optim.scheduler=constant", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0"],
                         tmp_path / "ours")
    start = copy.deepcopy(ours.acc.unwrap_model(ours.model))
    assert ours.train() == 0
    mine = [r for r in read_metrics(tmp_path / "ours") if "loss" in r]

    seen = []

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            m = self._metrics["train"]
            seen.append({"loss": float(loss), **{k: m[k][-1] for k in ("rewards/chosen", "rewards/rejected",
                                                                        "rewards/margins")}})
            return loss

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid", "sft"] if rpo_alpha else ["sigmoid"],
                     loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, seed=42, gradient_checkpointing=False,
                     dataloader_num_workers=0)
    trl = Recording(model=copy.deepcopy(start), ref_model=copy.deepcopy(start).eval(), args=args,
                    train_dataset=data, processing_class=ours.tokenizer)
    try:
        trl.train()
    finally:  # TRL's Accelerator set the process-wide state; later in-process runs build their own
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(seen) == steps == len(mine)
    for a, b in zip(mine, seen):  # shown with pytest -s
        print(f"step {a['step']}: loss {a['loss']:.7f} vs TRL {b['loss']:.7f}; margin "
              f"{a['rewards/margin']:.7f} vs {b['rewards/margins']:.7f}")
    for a, b in zip(mine, seen):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (mine, seen)
        assert abs(a["rewards/chosen"] - b["rewards/chosen"]) < 1e-4
        assert abs(a["rewards/rejected"] - b["rewards/rejected"]) < 1e-4
        assert abs(a["rewards/margin"] - b["rewards/margins"]) < 1e-4
    assert abs(mine[-1]["loss"] - math.log(2)) > 1e-3  # it trained


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.slow
@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_cli_run_resumes_bit_identically(tmp_path, pairs_file, reference):
    common = _overrides(pairs_file, "trainer.max_steps=8", "trainer.log_steps=1", "trainer.eval_steps=0",
                        "trainer.micro_batch_size=4", "data.eval_size=8", f"data.cache_dir={tmp_path / 'cache'}",
                        f"pref.precompute_ref={reference == 'precomputed'}")
    ref = tmp_path / "ref"
    run_cli([*common, "trainer.save_steps=4", f"output_dir={ref}"], check=True)
    losses = train_losses(ref)
    assert [s for s, _ in losses] == list(range(1, 9))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    run_cli([*common, "resume=auto", f"output_dir={resumed}"], check=True)
    assert train_losses(resumed) == losses[4:]
    if reference == "precomputed":  # computed once, read again by the resumed run
        assert len(list((tmp_path / "cache").rglob("reference-logps-*.safetensors"))) == 1
    rewards = lambda d: [r["rewards/margin"] for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert rewards(resumed) == rewards(ref)[4:]
    evals = [r for r in read_metrics(ref) if "eval_loss" in r]
    assert evals and {"eval_rewards/accuracy", "eval_rewards/margin", "eval_logps/chosen"} <= set(evals[-1])


# ----------------------------------------------------------------------------- from an SFT run
@pytest.fixture(scope="module")
def sft_final(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run_cli(["recipe=lora-llm", "trainer.max_steps=6", "trainer.micro_batch_size=8", "trainer.eval_steps=0",
             "trainer.sample_prompts=0", "optim.lr=1e-2", f"output_dir={run_dir}"], check=True)
    return run_dir / "final"


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tmp_path, pairs_file, sft_final):
    trainer = build_trainer(_overrides(pairs_file, f"model.adapter_path={sft_final}", "trainer.max_steps=2",
                                       "trainer.micro_batch_size=4", "trainer.eval_steps=0", "trainer.log_steps=1"),
                            tmp_path / "dpo")
    model = trainer.acc.unwrap_model(trainer.model)
    assert set(model.peft_config) == {"default", "reference"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    batch = trainer.collate([trainer.data.train[i] for i in range(4)])
    with torch.no_grad():
        policy = trainer.task.pair_outputs(trainer.model, batch)[3]
        reference = trainer.task.reference_logps(trainer.model, batch)
        with model.disable_adapter():
            base = trainer.task.pair_outputs(trainer.model, batch)[3]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # switch restored
    assert torch.allclose(policy, reference, atol=1e-6)  # the policy starts as the SFT model
    assert not torch.allclose(reference, base, atol=1e-2)  # ... which is not the base
    assert trainer.train() == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "dpo") if "loss" in r]
    assert abs(losses[0] - math.log(2)) < 1e-6
    final = tmp_path / "dpo" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "reference").exists()


# ----------------------------------------------------------------------------- reward model
def test_reward_model_loss_and_accuracy_equal_direct_computation(tmp_path, pairs_file):
    trainer = build_trainer(_overrides(pairs_file, "recipe=reward-llm", "pref.margin=0.5",
                                       "pref.center_coef=0.01"), tmp_path / "rm")
    model = trainer.acc.unwrap_model(trainer.model)
    assert model.config.num_labels == 1
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)  # the head trains
    perturb(model)
    model.eval()
    rows = [1, 4, 9, 16, 25]
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    with torch.no_grad():
        got = float(trainer.task.loss_sum(model, batch))
        _, metrics = trainer.task.eval_sums(model, batch)
        want, correct = 0.0, 0
        for i in rows:  # each sequence alone, unpadded: its score at the last token
            (c_ids, _), (r_ids, _) = _pair_sequences(trainer, i)
            rc, rr = (float(model(input_ids=torch.as_tensor(s)[None]).logits[0, 0]) for s in (c_ids, r_ids))
            want += -logsig(rc - rr - 0.5) + 0.01 * (rc + rr) ** 2
            correct += rc > rr
    assert abs(got - want) < 1e-4, (got, want)
    assert metrics["rewards/accuracy"] == correct and "logps/chosen" not in metrics


def test_model_card_names_the_method_and_beta(tmp_path):
    from finetune.outputs.model_card import build_card_data, hyperparameter_rows

    config = {"model": {"task": "dpo"}, "pref": {"loss": "ipo", "beta": 0.25, "label_smoothing": 0.0},
              "peft": {"method": "none"}, "optim": {"lr": 1e-3}}
    rows = dict(hyperparameter_rows(config))
    assert rows["method"] == "preference tuning, pref.loss=ipo" and rows["beta"] == 0.25
    assert {"dpo", "ipo"} <= set(build_card_data(tmp_path, config).tags)
    reward = {"model": {"task": "reward"}, "pref": {"margin": 0.0, "center_coef": 0.01}, "peft": {"method": "none"}}
    assert dict(hyperparameter_rows(reward))["method"] == "Bradley-Terry reward model"
    assert build_card_data(tmp_path, reward).pipeline_tag == "text-classification"
