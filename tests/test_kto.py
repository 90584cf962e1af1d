"""KTO (model.task=kto): the loss equals its formula in float64, the task's loss on a real tiny model
equals a direct computation (log-probs of each unpadded sequence, the KL estimate from the
mismatched sequences), the step's KL estimate makes accumulation 2x4 equal 1x8, per-step figures
match TRL's KTOTrainer, bad rows are one line naming file:line, and a CLI run on the shipped data
resumes bit for bit.

The KL estimate z is defined per OPTIMIZER STEP (all micro-batches, all ranks; finetune/tasks/kto.py):
so 2 micro-batches of 4 must give exactly the loss and gradients of one micro-batch of 8 (here),
and 2 ranks x 4 those of 1 rank x 8 (tests/distributed/test_kto_ddp.py)."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil

import pytest
import torch

from model_helpers import direct_logps, perturb
from run_helpers import build_trainer, read_metrics, run_cli, train_losses
from finetune.data.sample.make_sample import instruction_rows, kto_rows
from finetune.data.tokenize import IGNORE
from finetune.tasks.kto import KTO_LOSSES, kl_part, kto_losses


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_loss(loss, beta, r, desirable, z, wd, wu) -> float:
    """KTO's Eq. 7 (as TRL's loss_type names), written out on Python floats (float64)."""
    if loss == "kto":
        return wd * (1 - sig(beta * (r - z))) if desirable else wu * (1 - sig(beta * (z - r)))
    if loss == "apo_zero_unpaired":
        return wd * (1 - sig(beta * r)) if desirable else wu * sig(beta * r)
    raise AssertionError(loss)


@pytest.mark.parametrize("loss", KTO_LOSSES)
def test_loss_equals_its_float64_formula(loss):
    g = torch.Generator().manual_seed(0)
    n, beta, z, wd, wu = 16, 0.3, 0.7, 1.5, 0.6
    r = torch.randn(n, generator=g, dtype=torch.float64) * 4
    desirable = torch.rand(n, generator=g) < 0.5
    got, rewards = kto_losses(loss, beta, r, desirable, torch.tensor(z, dtype=torch.float64), wd, wu)
    for i in range(n):
        want = reference_loss(loss, beta, float(r[i]), bool(desirable[i]), z, wd, wu)
        assert abs(float(got[i]) - want) < 1e-12, (loss, i)
    assert torch.equal(rewards, beta * r)


# ----------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    rows = kto_rows(instruction_rows(random.Random(7), 64), random.Random(8))
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(path, *extra):
    return ["recipe=kto-llm", f"data.path={path}", "data.eval_split=null", "data.eval_size=0",
            "trainer.sample_prompts=0", *extra]


def _sequences(trainer, i):
    """(example ids, labels), (KL ids, labels), desirable of training row i."""
    row = trainer.data.train[i]
    k = abs(int(row["class_label"]))
    return ((row["input_ids"][:k].tolist(), row["labels"][:k].tolist()),
            (row["input_ids"][k:].tolist(), row["labels"][k:].tolist()), int(row["class_label"]) > 0)


def test_task_loss_equals_direct_computation(tmp_path, kto_file):
    trainer = build_trainer(_overrides(kto_file, "pref.desirable_weight=1.3", "pref.undesirable_weight=0.8",
                                       "pref.beta=0.5"), tmp_path / "run")
    model = trainer.acc.unwrap_model(trainer.model)
    perturb(model, seed=2)  # a seed where the estimate is positive (not clamped to 0)
    model.eval()
    rows = [0, 3, 7, 11, 20, 33]
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == 6
    p = trainer.cfg.pref
    with torch.no_grad():
        trainer.task.before_step(trainer, [batch])  # the step's z from its one micro-batch
        got = float(trainer.task.loss_sum(model, batch))
        alone = float(trainer.task.loss_sum(model, batch))  # outside a step: the batch's own z
        seqs = [_sequences(trainer, i) for i in rows]
        with model.disable_adapter():
            ref = [(direct_logps(model, *ex), direct_logps(model, *kl)) for ex, kl, _ in seqs]
        pol = [(direct_logps(model, *ex), direct_logps(model, *kl)) for ex, kl, _ in seqs]
    z = max(0.0, sum(pk - rk for (_, pk), (_, rk) in zip(pol, ref)) / len(rows))
    assert z > 0.05  # the clamp does not hide the estimate here
    want = sum(reference_loss("kto", p.beta, pe - re, d, z, 1.3, 0.8)
               for (pe, _), (re, _), (_, _, d) in zip(pol, ref, seqs))
    assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (got, want)
    assert abs(alone - got) < 1e-6
    assert {d for _, _, d in seqs} == {True, False}
    for ex, kl, _ in seqs:  # the completion (and end-of-turn marker) only; ends with <|end|>
        assert ex[1][-1] != IGNORE and ex[0][-1] == trainer.tokenizer.eos_token_id
        assert kl[1][-1] != IGNORE and kl[0][-1] == trainer.tokenizer.eos_token_id


def test_accumulation_2x4_equals_1x8_with_the_step_kl(tmp_path, kto_file):
    """One trainer, the same 8 rows as one micro-batch of 8, then as two of 4 (accumulate_gradients
    takes the step's micro-batches as given): the same loss and gradients."""
    trainer = build_trainer(_overrides(kto_file, "pref.beta=1.0"), tmp_path / "run")
    model = trainer.acc.unwrap_model(trainer.model)
    perturb(model, seed=2)  # the step's z is positive (> 0 after the clamp), its two halves' differ
    rows = [0, 5, 17, 42, 9, 23, 31, 60]  # uneven lengths, both labels

    def step(micro):
        batches = [trainer.collate([trainer.data.train[i] for i in rows[k:k + micro]]) for k in range(0, 8, micro)]
        loss = trainer.accumulate_gradients(batches, sum(trainer.task.count_targets(b) for b in batches))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return float(loss), grads, [trainer.task.kl_sums(trainer.model, b).tolist() for b in batches]

    big_loss, big, _ = step(8)
    small_loss, small, halves = step(4)
    assert abs(big_loss - small_loss) < 1e-5 and abs(big_loss - 0.5) > 1e-3
    assert big.keys() == small.keys() and big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name
    # ... and that is not trivially so: a per-micro-batch z (TRL's) differs between the halves.
    (s1, n1), (s2, n2) = halves
    assert abs(s1 / n1 - s2 / n2) > 1e-1 and (s1 + s2) / (n1 + n2) > 0


def test_lora_starts_from_an_sft_adapter(tmp_path, kto_file):
    """model.adapter_path: that adapter trains on and is the (frozen) reference, so at step 0 every
    log-ratio and z are 0 and each loss is w * (1 - sigmoid(0)) = w / 2."""
    sft = build_trainer(["recipe=lora-llm", "trainer.sample_prompts=0"], tmp_path / "sft")
    sft_model = sft.acc.unwrap_model(sft.model)
    perturb(sft_model, seed=3)
    sft_model.save_pretrained(tmp_path / "sft-final")
    trainer = build_trainer(_overrides(kto_file, f"model.adapter_path={tmp_path / 'sft-final'}",
                                       "pref.desirable_weight=2.0"), tmp_path / "kto")
    model = trainer.acc.unwrap_model(trainer.model)
    assert set(model.peft_config) == {"default", "reference"}
    rows = [0, 1, 2, 3, 4, 5]
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    with torch.no_grad():
        losses, rewards, _, kl = trainer.task.example_outputs(trainer.model, batch)
        with model.disable_adapter():
            base = trainer.task.example_outputs(trainer.model, batch)[2]
        policy = trainer.task.example_outputs(trainer.model, batch)[2]
    assert float(kl) == 0.0 and torch.allclose(rewards, torch.zeros_like(rewards), atol=1e-6)
    want = torch.where(batch["desirable"], 1.0, 0.5)
    assert torch.allclose(losses, want, atol=1e-6)
    assert not torch.allclose(policy, base, atol=1e-2)  # the SFT adapter is not the base


# ----------------------------------------------------------------------------- precomputed reference
def _live_reference(trainer, split, rows):
    """The live reference's (example, KL) log-probs of ``rows``, in batches of 5 (not the table's 4)."""
    data = trainer.data.train if split == "train" else trainer.data.eval
    out = []
    with torch.no_grad():
        for k in range(0, len(rows), 5):
            batch = trainer.collate([data[i] for i in rows[k:k + 5]])
            out.append(torch.stack([trainer.task.reference_logps(trainer.model, batch),
                                    trainer.task.reference_logps(trainer.model, kl_part(batch))], 1))
    return torch.cat(out)


@pytest.mark.parametrize("extra,scale", [((), 0.05), (("peft=none",), 0.02)], ids=["lora", "full"])
def test_precomputed_reference_equals_on_the_fly(tmp_path, kto_file, extra, scale, monkeypatch):
    """pref.precompute_ref=true: the table holds each row's reference log-prob of its example and of
    its KL sequence (fixed per row), so a step's loss, z, gradients and the eval metrics equal the
    live reference's; a second trainer reads the same file (same key) without computing it."""
    import finetune.tasks.reference_logps as reference_logps

    common = _overrides(kto_file, "trainer.micro_batch_size=4", "data.eval_size=6", "pref.beta=1.0",
                        f"data.cache_dir={tmp_path / 'cache'}", *extra)
    live = build_trainer(common, tmp_path / "live")
    pre = build_trainer([*common, "pref.precompute_ref=true"], tmp_path / "pre")
    assert live.task.ref_table is None and (live.task.ref_model is not None) == bool(extra)
    files = list(pre.data.cache_dir.glob("reference-logps-*.safetensors"))
    assert [f.name for f in files] == [f"reference-logps-{pre.task.ref_key}.safetensors"]
    assert pre.task.ref_key.endswith("-kto") and pre.task.ref_model is None  # full: the frozen copy is dropped
    table = pre.task.ref_table
    n = len(pre.data.train)
    assert table["train"].shape == (n, 2) and table["eval"].shape == (6, 2)
    order = list(range(n))
    random.Random(0).shuffle(order)  # other batch compositions and widths than the table's
    assert torch.allclose(table["train"][order], _live_reference(live, "train", order), atol=1e-5)
    assert torch.allclose(table["eval"], _live_reference(live, "eval", list(range(6))), atol=1e-5)
    assert not torch.allclose(table["train"][:, 0], table["train"][:, 1], atol=1e-2)  # two distinct columns

    for trainer in (live, pre):
        perturb(trainer.acc.unwrap_model(trainer.model), seed=2, scale=scale)  # z > 0 (not clamped)
    rows = [0, 5, 17, 42, 9, 23, 31, 50]
    grads, losses, kls = [], [], []
    for trainer in (live, pre):  # one step of 2 micro-batches of 4: the step's z from both
        micro = [{**trainer.collate([trainer.data.train[i] for i in part]), "row_ids": part}
                 for part in (rows[:4], rows[4:])]
        trainer.task.train_metric_sums()
        losses.append(float(trainer.accumulate_gradients(micro, 8)))
        kls.append(float(trainer.task.train_metric_sums()["kl"]) / 2)
        grads.append({n: p.grad for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters()
                      if p.requires_grad})
    assert abs(losses[0] - losses[1]) < 1e-6 and abs(kls[0] - kls[1]) < 1e-5 and kls[0] > 0.05
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name
    a, b = live.evaluate(), pre.evaluate()
    assert a.keys() == b.keys() and {"eval_kl", "eval_rewards/chosen", "eval_logps/chosen"} <= set(a)
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a if k != "step"), (a, b)
    assert a["eval_kl"] > 0

    def no_compute(*args):
        raise AssertionError("the reference table was computed again")

    monkeypatch.setattr(reference_logps, "_compute", no_compute)
    again = build_trainer([*common, "pref.precompute_ref=true"], tmp_path / "again")
    assert again.task.ref_key == pre.task.ref_key
    assert torch.equal(again.task.ref_table["train"], table["train"])
    assert torch.equal(again.task.ref_table["eval"], table["eval"])


def test_config_problems_are_reported():
    from run_helpers import compose
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["recipe=kto-llm", "pref.loss=sigmoid", "pref.beta=0", "pref.undesirable_weight=0"])
    text = str(err.value)
    assert "pref.loss=sigmoid is not valid for model.task=kto" in text and "pref.beta=0" in text
    assert "pref.undesirable_weight=0" in text
    with pytest.raises(ConfigError, match="does not fit data.format=preference"):
        compose(["recipe=kto-llm", "data=sample-preference"])
    with pytest.raises(ConfigError, match="data.packing=true is not available for model.task=kto"):
        compose(["recipe=kto-llm", "data.packing=true"])  # DPO packs pairs; KTO does not (yet)
    assert compose(["recipe=kto-llm", "pref.precompute_ref=true"]).pref.precompute_ref  # once refused


# ----------------------------------------------------------------------------- data
def _prepare(tmp_path, rows, *extra):
    from finetune.data import prepare_data
    from finetune.model.builtin import tiny_chat_tokenizer
    from run_helpers import compose

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["recipe=kto-llm", f"data.path={path}", "data.eval_split=null", "data.eval_size=0",
                   f"data.cache_dir={tmp_path / 'cache'}", *extra])
    return prepare_data(cfg, tiny_chat_tokenizer()), tiny_chat_tokenizer()


GOOD = {"prompt": "Say hi", "completion": "hi", "label": True}
BAD = {
    "missing-completion": ({"prompt": "x", "label": True}, "missing field 'completion'"),
    "empty-completion": ({"prompt": "x", "completion": " ", "label": False}, "field 'completion' is empty"),
    "wrong-type": ({"prompt": "x", "completion": 3, "label": True}, "field 'completion' must be a string"),
    "label-not-bool": ({"prompt": "x", "completion": "y", "label": "true"},
                       "field 'label' must be a boolean (true = desirable, false = undesirable), got str"),
    "label-int": ({"prompt": "x", "completion": "y", "label": 1}, "field 'label' must be a boolean"),
    "missing-label": ({"prompt": "x", "completion": "y"}, "missing field 'label'"),
    "empty-last-turn": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}],
                         "label": True}, "field 'messages': the last assistant message (the completion) is empty"),
    "no-assistant-end": ({"messages": [{"role": "user", "content": "q"}], "label": False},
                         "the conversation does not end with an assistant message"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_row_names_file_line(tmp_path, case):
    from finetune.errors import DataError

    row, expected = BAD[case]
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, [GOOD, row])
    assert f"kto.jsonl:2: {expected}" in str(err.value) and "data.on_bad_example=skip" in str(err.value)


def test_bad_row_cli_is_one_line_and_exit_3(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(BAD["label-not-bool"][0]) + "\n")
    result = run_cli(["recipe=kto-llm", "stage=preprocess", f"data.path={path}", "data.eval_split=null",
                      "data.eval_size=0", f"output_dir={tmp_path / 'run'}"],
                     env={"FINETUNE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"kto.jsonl:2: {BAD['label-not-bool'][1]}" in lines[0], result.stderr


def test_layouts_kl_sequences_truncation_and_counts(tmp_path):
    rows = [GOOD,
            {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "no"}], "label": False},
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
             "completion": {"role": "assistant", "content": "yes"}, "label": True},
            BAD["label-not-bool"][0], BAD["missing-completion"][0]]
    data, tok = _prepare(tmp_path, rows, "data.on_bad_example=skip")
    stats = data.stats["train"]
    assert stats["kept"] == 3 and stats["skipped_bad"] == 2 and stats["read"] == 5
    parts = []
    for i in range(3):
        r = data.train[i]
        k = abs(int(r["class_label"]))
        parts.append((tok.decode(r["input_ids"][:k]), tok.decode(r["input_ids"][k:]), int(r["class_label"]) > 0))
    assert [d for _, _, d in parts] == [True, False, True]
    ex = [e for e, _, _ in parts]
    assert ex[0] == "<|user|>Say hi<|end|><|assistant|>hi<|end|>"
    assert ex[1] == "<|user|>q1<|end|><|assistant|>a1<|end|><|user|>q2<|end|><|assistant|>no<|end|>"
    assert ex[2] == "<|system|>be brief<|end|><|user|>q<|end|><|assistant|>yes<|end|>"
    # KL sequence of row i: row i's prompt + row i-1's completion (row 0: the last row's)
    assert [kl for _, kl, _ in parts] == ["<|user|>Say hi<|end|><|assistant|>yes<|end|>",
                                          "<|user|>q1<|end|><|assistant|>a1<|end|><|user|>q2<|end|><|assistant|>hi<|end|>",
                                          "<|system|>be brief<|end|><|user|>q<|end|><|assistant|>no<|end|>"]
    # only the completion + <|end|> is labelled, in the example and in its KL sequence
    r = data.train[1]
    k = abs(int(r["class_label"]))
    labelled = [int(t) for t, lab in zip(r["input_ids"][:k], r["labels"][:k]) if lab != IGNORE]
    assert tok.decode(labelled) == "no<|end|>"
    # over-long rows: the prompt loses tokens from the left first, the completion keeps its end
    long = [{"prompt": "word " * 40, "completion": "the answer", "label": True},
            {"prompt": "short", "completion": "fine", "label": False}]
    data, tok = _prepare(tmp_path / "long", long, "data.max_seq_len=24")
    assert data.stats["train"]["truncated"] == 1 and data.stats["train"]["kept"] == 2  # row 1's both fit
    r = data.train[0]
    k = abs(int(r["class_label"]))
    assert k == 24 and len(r["input_ids"]) - k == 24  # the example and its KL sequence, each cut alone
    assert tok.decode(r["input_ids"][:k]).endswith("word <|end|><|assistant|>the answer<|end|>")
    assert tok.decode(r["input_ids"][k:]).endswith("word <|end|><|assistant|>fine<|end|>")
    data, _ = _prepare(tmp_path / "drop", long, "data.max_seq_len=24", "data.overlong=drop")
    assert data.stats["train"]["dropped_overlong"] == 1 and data.stats["train"]["kept"] == 1


# ----------------------------------------------------------------------------- TRL
def test_per_step_loss_kl_and_rewards_match_trl(tmp_path, kto_file):
    """Full fine-tuning, 8 examples = one batch per step on one process, so our per-step z and
    TRL's per-micro-batch z are the same number and the order of rows plays no part (TRL's KL
    pairs: completions rotated by one within each batch of 8 in dataset order, sequential sampling
    = ours over the 8 rows). kto loss, beta 0.1, weights 1 / 1, AdamW lr 1e-3 constant, no warmup /
    weight decay, clip 1.0. TRL's defaults differ in lr (1e-6), schedule (linear) and max_length
    (1024; no example here reaches it); precompute_ref_log_probs stays False (its default)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [json.loads(line) for line in kto_file.read_text().splitlines()][:8]
    assert {r["label"] for r in rows} == {True, False}
    path = tmp_path / "eight.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 4  # step 4 has a positive KL estimate (steps 1-3: clamped to 0 by both)
    ours = build_trainer(["recipe=kto-llm", "peft=none", f"data.path={path}", "data.eval_split=null",
                          "data.eval_size=0", "trainer.sample_prompts=0", "trainer.micro_batch_size=8",
                          f"trainer.max_steps={steps}", "trainer.log_steps=1", "trainer.eval_steps=0",
                          "trainer.save_steps=0", "optim.lr=1e-3", "optim.warmup_steps=0",
                          "optim.scheduler=constant", "optim.weight_decay=0.0", "optim.max_grad_norm=1.0"],
                         tmp_path / "ours")
    start = copy.deepcopy(ours.acc.unwrap_model(ours.model))
    assert ours.train() == 0
    mine = [r for r in read_metrics(tmp_path / "ours") if "loss" in r]

    seen = []

    class Recording(KTOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            m = self._metrics["train"]
            seen.append({"loss": float(loss), **{k: m[k][-1] for k in ("kl", "rewards/chosen", "rewards/rejected",
                                                                        "logps/chosen")}})
            return loss

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}],
                               "label": r["label"]} for r in rows])
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=42,
                     gradient_checkpointing=False, dataloader_num_workers=0, train_sampling_strategy="sequential")
    trl = Recording(model=copy.deepcopy(start), ref_model=copy.deepcopy(start).eval(), args=args,
                    train_dataset=data, processing_class=ours.tokenizer)
    try:
        trl.train()
    finally:  # TRL's Accelerator set the process-wide state; later in-process runs build their own
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert len(seen) == steps == len(mine)
    for a, b in zip(mine, seen):  # shown with pytest -s
        print(f"step {a['step']}: loss {a['loss']:.7f} vs TRL {b['loss']:.7f}; kl {a['kl']:.7f} vs {b['kl']:.7f}; "
              f"rewards/chosen {a['rewards/chosen']:.7f} vs {b['rewards/chosen']:.7f}")
    for a, b in zip(mine, seen):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(b[key])), (key, mine, seen)
    assert mine[-1]["kl"] > 0.1 and abs(mine[-1]["loss"] - mine[0]["loss"]) > 1e-2  # it trained; z mattered


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_cli_run_on_the_shipped_data_resumes_bit_identically(tmp_path):
    common = ["recipe=kto-llm", "trainer.max_steps=6", "trainer.log_steps=1", "trainer.eval_steps=3",
              "trainer.eval_max_batches=2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]
    ref = tmp_path / "ref"
    run_cli([*common, "trainer.save_steps=3", f"output_dir={ref}"], check=True)
    losses = train_losses(ref)
    assert [s for s, _ in losses] == list(range(1, 7))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    run_cli([*common, "resume=auto", f"output_dir={resumed}"], check=True)
    assert train_losses(resumed) == losses[3:]
    kl = lambda d: [(r["kl"], r["rewards/chosen"]) for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert kl(resumed) == kl(ref)[3:]
    evals = [r for r in read_metrics(ref) if "eval_loss" in r]
    assert evals and {"eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_logps/chosen"} <= set(evals[-1])
    stats = json.loads((ref / "data_stats.json").read_text())
    assert stats["train"]["kept"] == 1000 and stats["eval"]["kept"] == 100
    assert (ref / "final" / "adapter_model.safetensors").is_file() and not (ref / "final" / "reference").exists()


@pytest.mark.slow
def test_cli_resume_with_the_precomputed_reference_is_bit_identical(tmp_path, kto_file):
    """pref.precompute_ref=true through the CLI: the first run writes the table, the resumed run reads
    it (no second file, no recomputation) and continues bit for bit, train and eval rows alike."""
    common = _overrides(kto_file, "pref.precompute_ref=true", "trainer.max_steps=6", "trainer.log_steps=1",
                        "trainer.eval_steps=3", "data.eval_size=8", "trainer.micro_batch_size=4",
                        "trainer.grad_accum=2", "optim.lr=5e-3", f"data.cache_dir={tmp_path / 'cache'}")
    ref = tmp_path / "ref"
    first = run_cli([*common, "trainer.save_steps=3", f"output_dir={ref}"], check=True)
    assert "eval rows written to" in first.stdout + first.stderr
    losses = train_losses(ref)
    assert [s for s, _ in losses] == list(range(1, 7))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    again = run_cli([*common, "resume=auto", f"output_dir={resumed}"], check=True)
    assert "(precomputed)" in again.stdout + again.stderr and "rows written to" not in again.stdout + again.stderr
    assert len(list((tmp_path / "cache").rglob("reference-logps-*-kto.safetensors"))) == 1
    assert train_losses(resumed) == losses[3:]
    kl = lambda d: [(r["kl"], r["rewards/chosen"], r["rewards/rejected"])  # noqa: E731
                    for r in read_metrics(d) if "loss" in r]
    assert kl(resumed) == kl(ref)[3:] and any(k > 0 for k, _, _ in kl(ref))
    evals = lambda d: [r for r in read_metrics(d) if "eval_loss" in r]  # noqa: E731
    assert [r["step"] for r in evals(ref)] == [3, 6] and evals(resumed)[-1] == evals(ref)[-1]
