"""finetune/rl/objective.py against an independent float64 reference written from the formulas.

The reference below works on plain Python lists (one list of tokens per completion) with float64
``math``: it never calls objective.py. The module is driven as a trainer drives it: flat per-token
tensors in row-major order, ``token_rows`` naming each token's completion, and the step's loss
``sum(token_losses(...)[0] * token_weights(...)) / normaliser(...)``.

Semantics mirrored (TRL's GRPOTrainer): unbiased group std (``nanstd``), ``eps = 1e-4``;
``l_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta k3``; grpo = mean over
completions of the per-completion token mean, dapo = sum over the step's tokens / its tokens,
dr_grpo = sum / (completions x max_new_tokens); masked truncated completions have no tokens but
still count as completions.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from finetune.rl import objective as obj

EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04
MAX_NEW = 8
LOSSES = ("grpo", "dapo", "dr_grpo")

# Uneven groups (sizes 3, 1, 4 and an all-equal group of 2), interleaved on purpose: a group's
# completions need not be adjacent for the statistics.
GROUPS = [0, 2, 0, 1, 2, 3, 2, 0, 2, 3]
REWARDS = [1.0, 0.25, 0.0, 0.7, 2.0, 0.5, -1.0, 0.5, 0.75, 0.5]


# ----------------------------------------------------------------------------- the reference

def ref_group_stats(rewards, groups):
    by = {}
    for r, g in zip(rewards, groups):
        by.setdefault(g, []).append(float(r))
    mean = {g: math.fsum(v) / len(v) for g, v in by.items()}
    std = {}
    for g, v in by.items():
        if len(v) < 2:
            std[g] = 0.0
        else:
            std[g] = math.sqrt(math.fsum((x - mean[g]) ** 2 for x in v) / (len(v) - 1))
    return mean, std


def ref_unbiased_std(values):
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    m = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def ref_advantages(rewards, groups, scale):
    mean, std = ref_group_stats(rewards, groups)
    batch = ref_unbiased_std(rewards)
    out = []
    for r, g in zip(rewards, groups):
        d = float(r) - mean[g]
        if scale == "group":
            out.append(d / (std[g] + 1e-4))
        elif scale == "batch":
            out.append(d / (batch + 1e-4))
        else:
            out.append(d)
    return out


def ref_token(logp, old, ref, adv, beta):
    """One token: (loss, d loss / d logp, low clipped, high clipped), float64."""
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - EPS), 1 + EPS_HIGH)
    unclipped_term, clipped_term = ratio * adv, clipped * adv
    loss = -min(unclipped_term, clipped_term)
    # the gradient flows through ratio only where the unclipped term is the min
    grad = -ratio * adv if unclipped_term <= clipped_term else 0.0
    if beta:
        delta = ref - logp
        loss += beta * (math.exp(delta) - delta - 1)
        grad += beta * (1 - math.exp(delta))
    return loss, grad, (ratio < 1 - EPS and adv < 0), (ratio > 1 + EPS_HIGH and adv > 0)


def ref_step(loss_type, comps, advs, beta, trained=None):
    """The step's loss and per-token gradients (per completion lists), float64.

    ``comps``: per completion a list of (logp, old, ref) tokens; ``trained``: per completion,
    False for a masked truncated completion (its tokens do not count, it still is a completion)."""
    n = len(comps)
    trained = trained or [True] * n
    per = []  # per completion: list of (loss, grad)
    for toks, a, keep in zip(comps, advs, trained):
        per.append([ref_token(lp, o, r, a, beta)[:2] for lp, o, r in toks] if keep else [])
    total_tokens = sum(len(p) for p in per)
    grads = [[0.0] * len(toks) for toks in comps]
    if loss_type == "grpo":
        value = 0.0
        for i, p in enumerate(per):
            if p:
                value += math.fsum(l for l, _ in p) / len(p)
                for t, (_, g) in enumerate(p):
                    grads[i][t] = g / len(p) / n
        value /= n
    else:
        denom = total_tokens if loss_type == "dapo" else n * MAX_NEW
        value = math.fsum(l for p in per for l, _ in p) / denom
        for i, p in enumerate(per):
            for t, (_, g) in enumerate(p):
                grads[i][t] = g / denom
    return value, grads


# ----------------------------------------------------------------------------- the data

def make_step(seed=0, lengths=(5, 2, 7, 1, 4, 3, 6, 3, 8, 2)):
    """Per completion: (logp, old, ref) tokens. log(ratio) is drawn away from the clip edges
    (log 0.8 = -0.223, log 1.28 = 0.247) so float32 vs float64 never flips an indicator."""
    rng = random.Random(seed)
    pattern = [-0.5, 0.4, -0.35, 0.33, 0.05, -0.1, 0.15, 0.0]
    comps, k = [], 0
    for n in lengths:
        toks = []
        for _ in range(n):
            logp = -rng.uniform(0.05, 3.0)
            log_ratio = pattern[k % len(pattern)] + rng.uniform(-0.04, 0.04)
            k += 1
            old = logp - log_ratio
            ref = logp + rng.uniform(-0.6, 0.6)
            # round-trip through float32 so both sides see the same inputs
            toks.append(tuple(float(torch.tensor(x, dtype=torch.float32)) for x in (logp, old, ref)))
        comps.append(toks)
    return comps


def flat(comps, advs, trained=None):
    """The trainer's flat tensors: tokens of trained completions in row-major order."""
    trained = trained or [True] * len(comps)
    lp, old, ref, rows, tadv = [], [], [], [], []
    lengths = []
    for i, (toks, keep) in enumerate(zip(comps, trained)):
        lengths.append(len(toks) if keep else 0)
        if not keep:
            continue
        for a, b, c in toks:
            lp.append(a), old.append(b), ref.append(c), rows.append(i), tadv.append(advs[i])
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return {"logps": f32(lp).requires_grad_(True), "old": f32(old), "ref": f32(ref),
            "rows": torch.tensor(rows, dtype=torch.long), "adv": f32(tadv),
            "lengths": torch.tensor(lengths, dtype=torch.long)}


def module_sum(loss_type, t, beta, sl=slice(None), rows_offset=0, lengths=None):
    """sum(token_losses * token_weights) over the tokens ``sl`` of the flat tensors."""
    lp = t["logps"][sl]
    losses, _, _, _ = obj.token_losses(lp, t["old"][sl], t["adv"][sl], EPS, EPS_HIGH, beta, t["ref"][sl])
    rows = t["rows"][sl] - rows_offset
    w = obj.token_weights(loss_type, t["lengths"] if lengths is None else lengths, rows)
    return (losses * w).sum()


def module_adv(rewards=REWARDS, groups=GROUPS, scale="group"):
    r = torch.tensor(rewards, dtype=torch.float32)
    g = torch.tensor(groups, dtype=torch.long)
    step_std = None
    if scale == "batch":
        step_std = obj.batch_std(float(r.double().sum()), float((r.double() ** 2).sum()), len(rewards))
    return obj.advantages(r, g, scale, step_std)


# ----------------------------------------------------------------------------- 1. advantages

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_reference(scale):
    got = module_adv(scale=scale)
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    want = ref_advantages(REWARDS, GROUPS, scale)
    for i, (a, b) in enumerate(zip(got.tolist(), want)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), (scale, i, a, b)
    # the group of one (group 1) and the all-equal group (group 3) have exactly 0
    for i, g in enumerate(GROUPS):
        if g in (1, 3):
            assert got[i].item() == 0.0, (scale, i)
    # group centring: each group's advantages sum to 0
    for g in set(GROUPS):
        assert abs(sum(a for a, gg in zip(got.tolist(), GROUPS) if gg == g)) < 1e-6


def test_group_stats_uneven_groups():
    mean, std = obj.group_stats(torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS))
    rmean, rstd = ref_group_stats(REWARDS, GROUPS)
    assert mean.dtype == std.dtype == torch.float64
    for i, g in enumerate(GROUPS):
        assert mean[i].item() == pytest.approx(rmean[g], abs=1e-12)
        assert std[i].item() == pytest.approx(rstd[g], abs=1e-12)
    assert std[GROUPS.index(1)].item() == 0.0  # a group of one: 0, not NaN
    assert std[GROUPS.index(3)].item() == 0.0


def test_group_scale_uses_unbiased_std():
    # one group [0, 1]: unbiased std sqrt(0.5), not the population std 0.5
    got = obj.advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), "group").tolist()
    want = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert got == pytest.approx([-want, want], rel=1e-6)


def test_batch_std_is_unbiased_std_of_all_rewards():
    s = sum(REWARDS)
    sq = sum(r * r for r in REWARDS)
    assert obj.batch_std(s, sq, len(REWARDS)) == pytest.approx(statistics.stdev(REWARDS), rel=1e-12)
    assert obj.batch_std(s, sq, len(REWARDS)) == pytest.approx(ref_unbiased_std(REWARDS), rel=1e-12)
    # fewer than two completions: 0; all equal: 0 (never negative variance, never NaN)
    assert obj.batch_std(3.0, 9.0, 1) == 0.0
    assert obj.batch_std(0.0, 0.0, 0) == 0.0
    v = 0.1
    got = obj.batch_std(5 * v, 5 * v * v, 5)
    assert got == pytest.approx(0.0, abs=1e-7) and not math.isnan(got)


def test_degenerate_batches_have_no_nan():
    # every group of one, and every group all equal, under each scale
    for rewards, groups in (([1.0, 2.0, 3.0], [0, 1, 2]), ([2.0, 2.0, 2.0, 5.0, 5.0], [0, 0, 0, 1, 1])):
        for scale in ("group", "batch", "none"):
            got = module_adv(rewards, groups, scale)
            assert not torch.isnan(got).any(), (rewards, scale)
            assert (got == 0).all(), (rewards, scale, got)


# ----------------------------------------------------------------------------- 2. the step loss

@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("beta", [BETA, 0.0])
def test_step_loss_and_gradient_match_reference(loss_type, beta):
    comps = make_step()
    adv_t = module_adv()
    advs = adv_t.tolist()  # the float32 advantages, used by both sides
    t = flat(comps, advs)
    n_tokens = len(t["rows"])
    total = module_sum(loss_type, t, beta) / obj.normaliser(loss_type, len(comps), n_tokens, MAX_NEW)
    total.backward()

    want, want_grads = ref_step(loss_type, comps, advs, beta)
    assert total.item() == pytest.approx(want, abs=1e-6, rel=1e-6), (loss_type, total.item(), want)
    got_grads = t["logps"].grad.tolist()
    flat_want = [g for gs in want_grads for g in gs]
    assert len(got_grads) == len(flat_want)
    for k, (a, b) in enumerate(zip(got_grads, flat_want)):
        assert a == pytest.approx(b, abs=1e-5), (loss_type, beta, k, a, b)

    # the data exercises both clips and the regions where they do not act
    flags = [ref_token(lp, o, r, advs[i], beta)[2:] for i, toks in enumerate(comps) for lp, o, r in toks]
    assert any(lo for lo, _ in flags) and any(hi for _, hi in flags)
    ratios = [math.exp(lp - o) for toks in comps for lp, o, _ in toks]
    assert any(r < 1 - EPS for r in ratios) and any(r > 1 + EPS_HIGH for r in ratios)


def test_step_loss_against_float64_autograd():
    """A second, autograd-based reference: the same formulas in float64 torch, per completion."""
    comps = make_step(seed=3)
    advs = module_adv().tolist()
    for loss_type in LOSSES:
        t = flat(comps, advs)
        total = module_sum(loss_type, t, BETA) / obj.normaliser(loss_type, len(comps), len(t["rows"]), MAX_NEW)
        total.backward()
        leaves, parts = [], []
        for toks, a in zip(comps, advs):
            lp = torch.tensor([x[0] for x in toks], dtype=torch.float64, requires_grad=True)
            old = torch.tensor([x[1] for x in toks], dtype=torch.float64)
            ref = torch.tensor([x[2] for x in toks], dtype=torch.float64)
            ratio = torch.exp(lp - old)
            pg = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - EPS, 1 + EPS_HIGH) * a)
            d = ref - lp
            parts.append(pg + BETA * (torch.exp(d) - d - 1))
            leaves.append(lp)
        n = len(comps)
        if loss_type == "grpo":
            want = sum(p.mean() for p in parts) / n
        elif loss_type == "dapo":
            want = sum(p.sum() for p in parts) / sum(len(p) for p in parts)
        else:
            want = sum(p.sum() for p in parts) / (n * MAX_NEW)
        want.backward()
        assert total.item() == pytest.approx(want.item(), abs=1e-6, rel=1e-6), loss_type
        want_grad = torch.cat([lp.grad for lp in leaves])
        assert torch.allclose(t["logps"].grad.double(), want_grad, atol=1e-5, rtol=0), loss_type


# ----------------------------------------------------------------------------- 3. clip indicators

def test_clip_indicators_and_zero_gradient_on_clipped_tokens():
    comps = make_step(seed=1)
    advs = module_adv().tolist()
    t = flat(comps, advs)
    loss, kl, low, high = obj.token_losses(t["logps"], t["old"], t["adv"], EPS, EPS_HIGH, 0.0, t["ref"])
    assert (kl == 0).all()  # beta=0: zeros
    want = [ref_token(lp, o, r, advs[i], 0.0) for i, toks in enumerate(comps) for lp, o, r in toks]
    assert low.tolist() == [w[2] for w in want]
    assert high.tolist() == [w[3] for w in want]
    assert low.any() and high.any()
    assert not (low & high).any()

    loss.sum().backward()
    grad = t["logps"].grad
    clipped = low | high
    assert (grad[clipped] == 0).all()
    # every other token with A != 0 gets a gradient (-ratio * A), including ratio < 1 - eps with
    # A > 0 and ratio > 1 + eps_high with A < 0 where the clip does not act
    ratio = torch.exp(t["logps"].detach().double() - t["old"].double())
    active = ~clipped & (t["adv"] != 0)
    assert torch.allclose(grad[active].double(), -(ratio * t["adv"].double())[active], atol=1e-6)
    assert (grad[active] != 0).all()
    unacting = ((ratio < 1 - EPS) & (t["adv"] > 0)) | ((ratio > 1 + EPS_HIGH) & (t["adv"] < 0))
    assert unacting.any() and not clipped[unacting].any()
    assert (grad[t["adv"] == 0] == 0).all()


def test_clip_indicators_hand_made():
    # ratios between 1 + eps and 1 + eps_high, and between 1 - eps_high and 1 - eps, tell the
    # two epsilons apart
    ratios = [0.5, 0.5, 1.5, 1.5, 1.0, 0.9, 1.25, 0.75, 1.25, 0.75]
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    logps = torch.zeros(len(ratios))
    old = -torch.log(torch.tensor(ratios))
    loss, _, low, high = obj.token_losses(logps, old, adv, EPS, EPS_HIGH)
    assert low.tolist() == [True, False, False, False, False, False, False, True, False, False]
    assert high.tolist() == [False, False, True, False, False, False, False, False, False, False]
    # -min(ratio A, clip(ratio, 0.8, 1.28) A)
    want = [0.8, -0.5, -1.28, 1.5, -1.0, 0.9, -1.25, 0.8, 1.25, -0.75]
    assert loss.tolist() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- 4. accumulation

@pytest.mark.parametrize("loss_type", LOSSES)
def test_two_micro_batches_equal_one_batch(loss_type):
    comps = make_step(seed=2)
    advs = module_adv().tolist()
    n = len(comps)
    whole = flat(comps, advs)
    norm = obj.normaliser(loss_type, n, len(whole["rows"]), MAX_NEW)
    one = module_sum(loss_type, whole, BETA) / norm
    one.backward()

    split = 4  # completions 0..3 | 4..9
    parts = [flat(comps[:split], advs[:split]), flat(comps[split:], advs[split:])]
    acc = 0.0
    for p in parts:
        part = module_sum(loss_type, p, BETA) / norm  # the WHOLE step's normaliser
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(one.item(), abs=1e-6, rel=1e-6)
    grads = torch.cat([p["logps"].grad for p in parts])
    assert torch.allclose(grads, whole["logps"].grad, atol=1e-7)
    assert acc == pytest.approx(ref_step(loss_type, comps, advs, BETA)[0], abs=1e-6, rel=1e-6)


# ----------------------------------------------------------------------------- 5. mask_truncated

@pytest.mark.parametrize("loss_type", LOSSES)
def test_masked_truncated_completions(loss_type):
    lengths = (5, 8, 7, 1, 8, 3, 6, 3, 8, 2)  # 8 = MAX_NEW without EOS: truncated
    comps = make_step(seed=4, lengths=lengths)
    advs = module_adv().tolist()
    trained = [n < MAX_NEW for n in lengths]
    t = flat(comps, advs, trained)
    assert t["lengths"].tolist() == [n if keep else 0 for n, keep in zip(lengths, trained)]
    n_tokens = len(t["rows"])
    assert n_tokens == sum(n for n, keep in zip(lengths, trained) if keep)
    total = module_sum(loss_type, t, BETA) / obj.normaliser(loss_type, len(comps), n_tokens, MAX_NEW)
    total.backward()

    want, want_grads = ref_step(loss_type, comps, advs, BETA, trained)
    assert total.item() == pytest.approx(want, abs=1e-6, rel=1e-6)
    flat_want = [g for gs, keep in zip(want_grads, trained) if keep for g in gs]
    assert torch.allclose(t["logps"].grad.double(), torch.tensor(flat_want, dtype=torch.float64), atol=1e-5)

    # the truncated completions still count: dropping them from the step changes grpo / dr_grpo
    kept = [c for c, keep in zip(comps, trained) if keep]
    kept_adv = [a for a, keep in zip(advs, trained) if keep]
    dropped = ref_step(loss_type, kept, kept_adv, BETA)[0]
    if loss_type == "dapo":
        assert want == pytest.approx(dropped, abs=1e-12)
    else:
        assert want == pytest.approx(dropped * len(kept) / len(comps), abs=1e-12)
        assert abs(total.item() - dropped) > 1e-3


def test_grpo_weights_and_normalisers():
    lengths = torch.tensor([3, 0, 2])
    rows = torch.tensor([0, 0, 0, 2, 2])
    assert obj.token_weights("grpo", lengths, rows).tolist() == pytest.approx([1 / 3] * 3 + [0.5] * 2)
    for lt in ("dapo", "dr_grpo"):
        w = obj.token_weights(lt, lengths, rows)
        assert w.dtype == torch.float32 and w.tolist() == [1.0] * 5
    assert obj.normaliser("grpo", 3, 5, MAX_NEW) == 3
    assert obj.normaliser("dapo", 3, 5, MAX_NEW) == 5
    assert obj.normaliser("dr_grpo", 3, 5, MAX_NEW) == 3 * MAX_NEW


# ----------------------------------------------------------------------------- 6. bad values

def test_bad_scale_raises_naming_allowed_values():
    with pytest.raises(ValueError) as err:
        obj.advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), "bogus")
    msg = str(err.value)
    assert "bogus" in msg
    for allowed in ("group", "batch", "none"):
        assert allowed in msg


def test_bad_loss_raises():
    with pytest.raises(ValueError) as err:
        obj.token_weights("bogus", torch.tensor([2]), torch.tensor([0, 0]))
    msg = str(err.value)
    assert "bogus" in msg
    for allowed in LOSSES:
        assert allowed in msg
