"""Packed preference batches (model.task=dpo, data.packing=true): the same pairs in the same
micro-batches, only the layout changes. For every loss, packed == padded per-sequence log-probs,
loss and gradients; the packed loss equals its float64 formula; a precomputed reference equals the
on-the-fly one; a CLI run's per-step losses equal the unpacked run's and resume bit for bit; the
reward model and KTO refuse packing with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model_helpers import direct_logps, perturb
from run_helpers import build_trainer, compose, read_metrics, run_cli, train_losses
from test_preference import _overrides, _pair_sequences, pairs_file, reference_loss, sft_final  # noqa: F401 (fixtures)
from finetune.data.tokenize import IGNORE
from finetune.tasks.preference import LOSSES

ROWS = [0, 5, 17, 42, 9, 23, 31, 60]  # pairs of uneven lengths
CASES = [*LOSSES, "orpo-pair"]  # orpo: pref.orpo_sft=token (default); orpo-pair: per pair


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, pairs_file):  # noqa: F811
    """(padded, packed) LoRA trainers on the same data, weights and perturbation."""
    out = []
    for name, extra in (("padded", ()), ("packed", ("data.packing=true",))):
        trainer = build_trainer(_overrides(pairs_file, "pref.label_smoothing=0.0", *extra),
                                tmp_path_factory.mktemp(name) / "run")
        perturb(trainer.acc.unwrap_model(trainer.model))
        out.append(trainer)
    return out


def _set_loss(trainer, case: str) -> None:
    loss, _, sft = case.partition("-")
    trainer.cfg.pref.loss, trainer.cfg.pref.orpo_sft = loss, sft or "token"
    trainer.task._sft_scale = None  # ORPO token: no step's figure left from an earlier test


def _step(trainer, rows):
    """One optimizer step's loss and gradients over ``rows`` (one micro-batch)."""
    model = trainer.acc.unwrap_model(trainer.model)
    model.zero_grad(set_to_none=True)
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    loss = trainer.accumulate_gradients([batch], trainer.task.count_targets(batch))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def test_packed_batch_layout(trainers):
    padded, packed = trainers
    batch = packed.collate([packed.data.train[i] for i in ROWS])
    assert "attention_mask" not in batch and packed.acc.unwrap_model(packed.model).config._attn_implementation \
        == "finetune_sdpa_packed"
    owners = batch["sequence_ids"]
    per_row = [len(set(r.tolist()) - {-1}) for r in owners]
    assert batch["input_ids"].shape[0] < 2 * len(ROWS) and max(per_row) >= 3  # several sequences a row
    assert sum(per_row) == 2 * len(ROWS) and batch["num_tokens"] == int((owners >= 0).sum())
    ref = padded.collate([padded.data.train[i] for i in ROWS])
    for i in range(2 * len(ROWS)):  # each sequence whole, position ids from 0, its targets unchanged
        at = (owners == i).nonzero()
        row, cols = int(at[0, 0]), at[:, 1]
        k = int(ref["attention_mask"][i].sum())
        assert len(cols) == k and torch.equal(cols, torch.arange(int(cols[0]), int(cols[0]) + k))
        assert torch.equal(batch["input_ids"][row, cols], ref["input_ids"][i, :k])
        assert torch.equal(batch["position_ids"][row, cols], torch.arange(k))
        assert torch.equal(batch["labels"][row, cols][1:], ref["labels"][i, 1:k])
        assert batch["labels"][row, cols[0]] == IGNORE  # no target across a sequence boundary


# The plain LM head (trainer.chunked_loss=off) on one reference loss and one reference-free loss.
@pytest.mark.parametrize("case,chunked", [*((c, True) for c in CASES), ("sigmoid", False), ("orpo", False)],
                         ids=[*CASES, "sigmoid-plain-head", "orpo-plain-head"])
def test_packed_equals_padded(trainers, case, chunked):
    for trainer in trainers:
        _set_loss(trainer, case)
        trainer.task.chunked = chunked
    try:
        with torch.no_grad():
            outs = [t.task.pair_outputs(t.model, t.collate([t.data.train[i] for i in ROWS])) for t in trainers]
        for a, b in zip(*outs):  # per-pair losses, rewards, then the 2n per-sequence log-probs
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), (case, (a - b).abs().max())
        (loss_a, grads_a), (loss_b, grads_b) = (_step(t, ROWS) for t in trainers)
    finally:
        for trainer in trainers:
            trainer.task.chunked = True
    assert abs(loss_a - loss_b) < 1e-5 and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("case", CASES)
def test_packed_loss_equals_float64_formula(trainers, case):
    """Each sequence alone through the model in float64 (tests/model_helpers.py), the loss from its
    formula (tests/test_preference.py), against the task's loss on one packed batch."""
    _, trainer = trainers
    _set_loss(trainer, case)
    model = trainer.acc.unwrap_model(trainer.model)
    p = trainer.cfg.pref
    with torch.no_grad():
        got = float(trainer.task.loss_sum(model, trainer.collate([trainer.data.train[i] for i in ROWS])))
        trainer.task.train_metric_sums()
        want, nll, tokens = 0.0, 0.0, 0
        for i in ROWS:
            (c_ids, c_lab), (r_ids, r_lab) = _pair_sequences(trainer, i)
            pc, pr = direct_logps(model, c_ids, c_lab), direct_logps(model, r_ids, r_lab)
            with model.disable_adapter():
                rc, rr = direct_logps(model, c_ids, c_lab), direct_logps(model, r_ids, r_lab)
            lc, lr = sum(x != IGNORE for x in c_lab[1:]), sum(x != IGNORE for x in r_lab[1:])
            want += reference_loss(p.loss, p.beta, pc, pr, rc, rr, lc, lr, p.label_smoothing, p.gamma, p.orpo_lambda)
            if case == "orpo":  # the per-token SFT term (pref.orpo_sft=token) instead of the per-pair one
                want, nll, tokens = want + pc / lc, nll - pc, tokens + lc
    if tokens:
        want += len(ROWS) * nll / tokens
    assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (case, got, want)


def test_precomputed_reference_packed_equals_on_the_fly(tmp_path, pairs_file, trainers):  # noqa: F811
    padded, live = trainers
    _set_loss(live, "sigmoid")
    pre = build_trainer(_overrides(pairs_file, "pref.label_smoothing=0.0", "data.packing=true",
                                   "pref.precompute_ref=true", "data.eval_size=6"), tmp_path / "pre")
    rows = ROWS[:4]
    with torch.no_grad():
        want = padded.task.reference_logps(padded.model, padded.collate([padded.data.train[i] for i in rows]))
        on_the_fly = live.task.reference_logps(live.model, live.collate([live.data.train[i] for i in rows]))
    assert torch.allclose(on_the_fly, want, atol=1e-5)
    # pre's rows are its own (6 held out for eval); its table was computed on packed batches
    full = pre.task.ref_table
    assert full["train"].shape == (len(pre.data.train), 2) and full["eval"].shape == (6, 2)
    with torch.no_grad():
        direct = pre.task.reference_logps(pre.model, pre.collate([pre.data.train[i] for i in rows]))
    assert torch.allclose(full["train"][rows].T.reshape(-1), direct, atol=1e-5)
    perturb(pre.acc.unwrap_model(pre.model))
    pre.task.ref_table = None  # the same trainer with the reference on the fly: the same loss and gradients
    live_loss, live_grads = _step_with_ids(pre, rows)
    evals_live = pre.evaluate()
    pre.task.ref_table = full
    pre_loss, pre_grads = _step_with_ids(pre, rows)
    evals_pre = pre.evaluate()
    assert abs(live_loss - pre_loss) < 1e-6 and abs(live_loss - 0.6931) > 1e-3
    assert all(abs(evals_live[k] - evals_pre[k]) < 1e-5 for k in evals_live if k != "step")
    for name in live_grads:
        assert torch.allclose(live_grads[name], pre_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("reference", ["frozen-copy", pytest.param("sft-adapter", marks=pytest.mark.slow)])
def test_other_references_packed_equal_padded(tmp_path, pairs_file, reference, request):  # noqa: F811
    """peft=none (a frozen copy of the model) and an SFT adapter loaded again as the reference."""
    extra = (("peft=none",) if reference == "frozen-copy"
             else (f"model.adapter_path={request.getfixturevalue('sft_final')}",))
    trainers = [build_trainer(_overrides(pairs_file, *extra, *layout), tmp_path / name)
                for name, layout in (("padded", ()), ("packed", ("data.packing=true",)))]
    for trainer in trainers:
        perturb(trainer.acc.unwrap_model(trainer.model))
    (loss_a, grads_a), (loss_b, grads_b) = (_step(t, ROWS) for t in trainers)
    assert abs(loss_a - loss_b) < 1e-5 and abs(loss_a - 0.6931) > 1e-3
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


def _step_with_ids(trainer, rows):
    model = trainer.acc.unwrap_model(trainer.model)
    model.zero_grad(set_to_none=True)
    batch = {**trainer.collate([trainer.data.train[i] for i in rows]), "row_ids": rows}
    loss = float(trainer.accumulate_gradients([batch], len(rows)))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_reward_and_kto_refuse_packing_in_one_line(tmp_path, pairs_file):  # noqa: F811
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="data.packing=true is not available for model.task=kto"):
        compose(["recipe=kto-llm", "data.packing=true"])
    result = run_cli([*_overrides(pairs_file, "recipe=reward-llm", "data.packing=true"), f"output_dir={tmp_path}"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "data.packing=true is not available for model.task=reward; set data.packing=false" in lines[0]


# ----------------------------------------------------------------------------- whole runs
def _cli(pairs_file, out, *extra):  # noqa: F811
    # Random batches (group_by_length=false), where padding costs most and packing saves it; both
    # layouts draw the same pairs either way (finetune/train/loop.py).
    return run_cli([*_overrides(pairs_file, "trainer.max_steps=6", "trainer.log_steps=1", "trainer.eval_steps=3",
                                "trainer.micro_batch_size=4", "trainer.grad_accum=2", "data.eval_size=8",
                                "trainer.group_by_length=false", "pref.loss=orpo", *extra),
                    f"output_dir={out}"], check=True)


@pytest.mark.slow
def test_cli_packed_run_equals_unpacked_and_resumes_bit_identically(tmp_path, pairs_file):  # noqa: F811
    """ORPO with pref.orpo_sft=token: its per-token weight counts the step's chosen tokens over both
    micro-batches, so it exercises chosen_tokens on packed batches too."""
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    _cli(pairs_file, tmp_path / "padded", cache)
    _cli(pairs_file, tmp_path / "packed", cache, "data.packing=true", "trainer.save_steps=3")
    padded, packed = train_losses(tmp_path / "padded"), train_losses(tmp_path / "packed")
    assert [s for s, _ in packed] == list(range(1, 7)) and [s for s, _ in padded] == list(range(1, 7))
    for (_, a), (_, b) in zip(padded, packed):
        assert abs(a - b) < 1e-5, (padded, packed)
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / d) if "eval_loss" in r] for d in ("padded", "packed")]
    assert evals[0] and all(abs(a - b) < 1e-5 for a, b in zip(*evals))
    stats = json.loads((tmp_path / "packed" / "data_stats.json").read_text())["packing"]
    assert stats["train"]["packing_efficiency"] > stats["train"]["padded_efficiency"]
    assert stats["train"]["rows"] < 2 * 4 * stats["train"]["micro_batches"]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "packed" / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    _cli(pairs_file, resumed, cache, "data.packing=true", "resume=auto")
    assert train_losses(resumed) == packed[3:]
