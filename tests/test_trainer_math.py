"""Loss maths of the loop: accumulation equals one big batch; schedules; weight-decay groups."""

import numpy as np
import pytest
import torch

from run_helpers import build_trainer, compose
from finetune.tasks.causal_lm import count_targets
from finetune.train.optim import build_scheduler, lr_lambda, param_groups
from finetune.train.feed import BatchPlan


def _one_step_gradients(tmp_path, name, micro, accum, rows, extra=()):
    """Loss and gradients of one optimizer step over ``rows`` split as ``accum`` x ``micro``."""
    trainer = build_trainer(["recipe=lora-llm", f"trainer.micro_batch_size={micro}",
                             f"trainer.grad_accum={accum}", "peft.dropout=0.0", *extra], tmp_path / name)
    batches = [trainer.collate([trainer.data.train[i] for i in rows[k * micro:(k + 1) * micro]])
               for k in range(accum)]
    loss = trainer.accumulate_gradients(batches, sum(count_targets(b) for b in batches))
    model = trainer.acc.unwrap_model(trainer.model)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_equals_one_big_batch(tmp_path, packing):
    # Rows of uneven lengths (and uneven target counts) in one optimizer step of 8 rows.
    rows = [0, 5, 17, 42, 99, 123, 256, 311]
    extra = [f"data.packing={str(packing).lower()}"]
    big_loss, big = _one_step_gradients(tmp_path, "big", 8, 1, rows, extra)
    small_loss, small = _one_step_gradients(tmp_path, "small", 2, 4, rows, extra)
    assert abs(big_loss - small_loss) < 1e-5
    assert big.keys() == small.keys()
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-5, rtol=1e-4), name


def test_naive_mean_of_micro_means_would_differ(tmp_path):
    """The trap the normalisation avoids: averaging per-micro-batch means weights short rows up."""
    trainer = build_trainer(["recipe=lora-llm", "trainer.micro_batch_size=2"], tmp_path / "naive")
    rows = [[0, 5], [17, 42], [99, 123], [256, 311]]
    batches = [trainer.collate([trainer.data.train[i] for i in r]) for r in rows]
    counts = [count_targets(b) for b in batches]
    assert len(set(counts)) > 1  # uneven target counts, or the test proves nothing
    model = trainer.model
    with torch.no_grad():
        sums = [float(trainer.task.loss_sum(model, b)) for b in batches]
    exact = sum(sums) / sum(counts)
    naive = sum(s / c for s, c in zip(sums, counts)) / len(counts)
    assert abs(exact - naive) > 1e-4


def test_lr_schedules_with_warmup():
    f = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    g = lr_lambda("linear", warmup=0, total=100, min_ratio=0.0)
    assert g(0) == 1.0 and g(50) == pytest.approx(0.5) and g(100) == 0.0
    h = lr_lambda("constant", warmup=4, total=100, min_ratio=0.0)
    assert h(1) == pytest.approx(0.5) and h(50) == 1.0


def test_warmup_ratio_is_used_when_steps_unset():
    cfg = compose(["recipe=lora-llm", "optim.warmup_steps=0", "optim.warmup_ratio=0.1", "optim.scheduler=constant"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.optim, total_steps=50)  # 5 warmup steps
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def _lrs(overrides: list[str], total: int, steps: int) -> list[float]:
    cfg = compose(["recipe=lora-classifier", *overrides])  # the recipe sets warmup_steps=10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.optim, total_steps=total)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_both_warmup_keys_zero_means_no_warmup(kind):
    """optim.warmup_steps=0 optim.warmup_ratio=0: step 0 trains at the peak lr and the schedule is
    transformers' own with num_warmup_steps=0 (the peer a user compares with)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    ours = _lrs(["optim.warmup_steps=0", "optim.warmup_ratio=0", f"optim.scheduler={kind}"], 150, 150)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    sched = make(opt, num_warmup_steps=0, num_training_steps=150)
    theirs = []
    for _ in range(150):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert ours[0] == 1.0
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_warmup_steps_wins_over_the_ratio_and_the_ratio_rounds_up():
    """The documented meanings (finetune/config/schema.py OptimConfig): warmup_steps when > 0 (the
    ratio is then ignored), else ceil(warmup_ratio x total steps) steps of linear warmup."""
    constant = "optim.scheduler=constant"
    assert _lrs(["optim.warmup_steps=4", "optim.warmup_ratio=0.5", constant], 100, 6) == \
        pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    # ceil(0.03 x 100) = 3 steps
    assert _lrs(["optim.warmup_steps=0", "optim.warmup_ratio=0.03", constant], 100, 5) == \
        pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    # The recipe's own warmup_steps=10 applies unless overridden.
    assert _lrs([constant], 100, 11)[9:] == pytest.approx([1.0, 1.0]) and _lrs([constant], 100, 1)[0] == 0.1


def test_weight_decay_excludes_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_module("final_norm", torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_batch_plan_same_rows_per_step_for_any_split():
    lengths = torch.randint(5, 50, (103,)).numpy()
    a = BatchPlan(103, 4, 2, 2, seed=3, row_lengths=lengths)  # 2 ranks x 4 x 2
    b = BatchPlan(103, 8, 2, 1, seed=3, row_lengths=lengths)  # 1 rank x 8 x 2
    assert a.steps_per_epoch == b.steps_per_epoch == 6 and a.rows_unused_per_epoch == 7
    for step in range(a.steps_per_epoch):
        rows_a = sorted(r for rank in range(2) for mb in a.micro_batches(0, step, rank)[:2] for r in mb)
        rows_b = sorted(r for mb in b.micro_batches(0, step, 0)[:2] for r in mb)
        assert rows_a == rows_b
    assert not (set(a.epoch_order(0).ravel()) ^ set(b.epoch_order(0).ravel()))
    assert (a.epoch_order(0) != a.epoch_order(1)).any()  # a new order every epoch


def test_length_split_keeps_each_steps_rows_and_cuts_padding():
    """trainer.length_split=k: each micro-batch's rows (the same random draw) in k parts, longest
    first, on every rank; fewer padded tokens; a resumed position gives the same parts."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 120, 16 * 50)
    plain = BatchPlan(len(lengths), 8, 2, 1, seed=4)
    split = BatchPlan(len(lengths), 8, 2, 1, seed=4, length_split=4, split_lengths=lengths)
    assert split.batches_per_step == 8
    a, b = plain.micro_batches(0, 0, 0), split.micro_batches(0, 0, 0)
    assert len(b) == 4 * len(a)
    for k, rows in enumerate(a):
        parts = b[4 * k:4 * k + 4]
        assert sorted(r for p in parts for r in p) == sorted(rows) and [len(p) for p in parts] == [2, 2, 2, 2]
        flat = [lengths[r] for p in parts for r in p]
        assert flat == sorted(flat, reverse=True)

    def padded(batches):
        return sum(len(mb) * max(lengths[mb]) for mb in batches)

    assert padded(b) < 0.75 * padded(a)
    assert split.micro_batches(0, 7, 0) == b[7 * 8:]  # resuming at step 7: the same parts


def test_length_split_gives_the_unsplit_loss_and_gradients(tmp_path):
    """The same step's rows as 1 or 4 length-sorted parts: one loss and gradient (token-normalised
    over the step), so length_split changes padding, not the optimisation."""
    def first_step(name, k):
        trainer = build_trainer(["recipe=lora-llm", "data.packing=false", "trainer.group_by_length=false",
                                 "trainer.micro_batch_size=8", "peft.dropout=0.0", f"trainer.length_split={k}"],
                                tmp_path / name)
        micro = next(trainer.feed.steps(0))
        loss = trainer.accumulate_gradients(micro, sum(count_targets(b) for b in micro))
        model = trainer.acc.unwrap_model(trainer.model)
        rows = sorted(r for b in micro for r in b["row_ids"])
        width = sum(b["input_ids"].numel() for b in micro)
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, rows, width

    loss1, grads1, rows1, width1 = first_step("one", 1)
    loss4, grads4, rows4, width4 = first_step("four", 4)
    assert rows1 == rows4 and width4 < width1  # same rows, fewer padded positions
    assert abs(loss1 - loss4) < 1e-5
    for name in grads1:
        assert torch.allclose(grads1[name], grads4[name], atol=1e-5, rtol=1e-4), name


def test_length_split_refuses_packed_or_oversized_splits():
    from finetune.errors import ConfigErrors

    with pytest.raises(ConfigErrors, match="trainer.length_split=2 splits unpacked"):
        compose(["recipe=lora-llm", "data.packing=true", "trainer.length_split=2"])
    with pytest.raises(ConfigErrors, match="must be <= trainer.micro_batch_size=2"):
        compose(["recipe=lora-llm", "data.packing=false", "trainer.micro_batch_size=2", "trainer.length_split=4"])


def test_length_grouping_window_trades_padding_for_mixing():
    """``group_steps`` steps' rows are sorted together: 1 keeps each step's random rows (only the
    order inside a step changes), wider windows pad less, and every row is still used once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 90, 16 * 400)
    plain = BatchPlan(len(lengths), 16, 1, 1, seed=5)

    def plan(k):
        return BatchPlan(len(lengths), 16, 1, 1, seed=5, row_lengths=lengths, group_steps=k)

    def padded_tokens(p):
        order = p.epoch_order(0)
        return int((lengths[order].max(axis=1) * order.shape[1]).sum())

    same_steps = {frozenset(s) for s in plain.epoch_order(0).tolist()}
    assert {frozenset(s) for s in plan(1).epoch_order(0).tolist()} == same_steps
    padded = [padded_tokens(p) for p in (plain, plan(2), plan(8), plan(50))]
    assert padded == sorted(padded, reverse=True) and padded[2] < 0.7 * padded[0]
    for k in (2, 8, 50):
        order = plan(k).epoch_order(0)
        assert sorted(order.ravel().tolist()) == list(range(len(lengths)))
        # A step never mixes rows of two windows (the epoch's permutation cut into k-step windows).
        window = np.empty(len(lengths), int)
        window[np.random.default_rng([5, 0]).permutation(len(lengths))] = np.arange(len(lengths)) // (k * 16)
        assert all(len(set(window[step])) == 1 for step in order)
