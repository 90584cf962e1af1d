"""GRPO (model.task=grpo) on the loop: the rollout's log-probs equal a direct computation, the loss
and gradients equal TRL's GRPOTrainer on the same rollout, sampling is a seeded draw independent of
the batch layout, accumulation equals one big batch, a CLI run resumes bit for bit inside the mu
updates of a rollout, and bad reward functions or settings are one line. The objective's formulas
themselves: tests/test_rl_objective.py; 2 processes == 1: tests/distributed/test_grpo_ddp.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from model_helpers import perturb
from run_helpers import build_trainer, compose, read_metrics, run_cli, train_losses
from finetune.data.tokenize import IGNORE
from finetune.rl.rollout import token_logps, token_rows
from finetune.rl.sampling import SamplingSettings, SeededGumbel, generate, row_seed

# A reward with signal for an untrained model: shorter completions score higher.
LENGTH = "rl.rewards=[{_target_: finetune.rl.rewards.length_penalty, target_tokens: 3}]"


def _overrides(*extra):
    return ["recipe=grpo-llm", "trainer.exact_match_prompts=0", "trainer.sample_prompts=0", "trainer.eval_steps=0",
            "rl.num_generations=4", "rl.max_new_tokens=8", "trainer.micro_batch_size=4", *extra]


def _perturb(model, seed=0, scale=0.02):  # every weight: full fine-tuning and LoRA alike
    perturb(model, seed, scale, trainable_only=False)


def _prompt_batch(trainer, rows):
    batch = trainer.collate([trainer.data.train[i] for i in rows])
    batch["row_ids"] = list(rows)
    return batch


def _same_prompt_length_rows(trainer, n):
    by_len = {}
    for i in range(len(trainer.data.train)):
        first = int((trainer.data.train[i]["labels"] != IGNORE).argmax())
        by_len.setdefault(first, []).append(i)
    return max(by_len.values(), key=len)[:n]


# ----------------------------------------------------------------------------- rollout
def test_rollout_rows_and_logps_equal_a_direct_computation(tmp_path):
    trainer = build_trainer(_overrides("peft=none", "rl.temperature=0.7"), tmp_path / "run")
    model = trainer.acc.unwrap_model(trainer.model)
    _perturb(model)
    rows = [3, 10, 25, 40]  # prompts of different lengths: left padding in play
    pb = _prompt_batch(trainer, rows)
    assert len({len(p) for p in pb["prompts"]}) > 1
    batch = trainer.task.make_rollout(0, [pb])[0]
    eos, tok = trainer.tokenizer.eos_token_id, trainer.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[0] == 16 and batch["num_completions"] == 16
    width = ids.shape[1] - max(len(p) for p in pb["prompts"])
    model.eval()
    with torch.no_grad():
        flat = token_logps(model, batch, temperature=0.7)
    direct, k = [], 0
    for r in range(16):
        prompt = pb["prompts"][r // 4]
        row_ids, row_mask = ids[r].tolist(), mask[r].tolist()
        real = [t for t, m in zip(row_ids, row_mask) if m]
        completion = real[len(prompt):]
        assert real[:len(prompt)] == prompt  # left-padded prompt, then the completion
        assert 1 <= len(completion) <= width
        assert (eos not in completion[:-1]) and (completion[-1] == eos or len(completion) == 8)
        assert [t for t in labels[r].tolist() if t != IGNORE] == completion  # every completion token, EOS included
        with torch.no_grad():  # one unpadded sequence, full logits, float64
            logits = model(input_ids=torch.tensor([real]), use_cache=False).logits[0].double() / 0.7
        logp = logits.log_softmax(-1)
        direct += [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(completion)]
        k += len(completion)
    assert len(flat) == k
    assert max(abs(a - b) for a, b in zip(flat.tolist(), direct)) < 1e-4
    # the groups: 4 completions of one prompt; the advantage of each is its length penalty normalised in it
    assert torch.equal(token_rows(labels), torch.repeat_interleave(torch.arange(16), (labels != IGNORE).sum(1)))
    assert tok.decode(pb["references"][0], skip_special_tokens=True) == trainer.task._score(
        [pb["prompts"][0]], torch.tensor([[eos]]), torch.tensor([1]), torch.tensor([False]),
        [pb["references"][0]], [rows[0]])[4][0]


def test_sampling_is_a_seeded_draw_independent_of_the_batch_layout(tmp_path):
    trainer = build_trainer(_overrides(), tmp_path / "run")
    model = trainer.acc.unwrap_model(trainer.model)
    _perturb(model, scale=0.05)
    prompts = [trainer.collate([trainer.data.train[i]])["prompts"][0] for i in (1, 7, 12, 30, 44, 51)]
    seeds = [row_seed(42, 3, r, 0) for r in range(6)]
    s = SamplingSettings(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95)
    pad, eos, dev = trainer.tokenizer.pad_token_id, trainer.tokenizer.eos_token_id, trainer.acc.device

    def completions(ps, ss):
        out = generate(model, ps, ss, s, pad, eos, dev)[2]
        return [row[:next((j + 1 for j, t in enumerate(row) if t == eos), len(row))] for row in out.tolist()]

    together = completions(prompts, seeds)
    apart = completions(prompts[:2], seeds[:2]) + completions(prompts[2:], seeds[2:])
    reversed_ = completions(prompts[::-1], seeds[::-1])[::-1]
    assert together == apart == reversed_
    assert completions(prompts, [row_seed(42, 4, r, 0) for r in range(6)]) != together  # another rollout
    model.train()
    completions(prompts[:1], seeds[:1])
    assert model.training  # generation runs in eval mode and puts the model back as it found it


def test_gumbel_sampler_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    want = torch.softmax(logits[0], -1)
    n = 20000
    counts = torch.zeros(5)
    for start in range(0, n, 1000):
        proc = SeededGumbel([row_seed(0, 0, i, 0) for i in range(start, start + 1000)])
        picks = proc(None, logits.expand(1000, -1).clone()).argmax(-1)
        counts += torch.bincount(picks, minlength=5).float()
    freq = counts / n
    assert counts[4] == 0  # a filtered token (top-k / top-p: -inf) is never drawn
    assert float((freq - want).abs().max()) < 0.015, (freq, want)


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_accumulation_2x2_equals_1x4(tmp_path, loss):
    def one_step(name, micro, accum):
        trainer = build_trainer(_overrides(f"rl.loss={loss}", LENGTH, "rl.epochs_per_batch=2", "rl.beta=0.04",
                                           f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}"),
                                tmp_path / name)
        model = trainer.acc.unwrap_model(trainer.model)
        _perturb(model)
        rows = [0, 5, 17, 42]
        prompt_micro = [_prompt_batch(trainer, rows[k * micro:(k + 1) * micro]) for k in range(accum)]
        micro_batches = trainer.task.make_rollout(0, prompt_micro)
        for b in micro_batches:  # the clip and the ratio in play: old log-probs off the current ones
            b["old_logps"] = b["old_logps"] + 0.3 * torch.sin(7 * b["old_logps"])  # a function of the token alone
        model.train()
        value = trainer.accumulate_gradients(micro_batches, sum(trainer.task.count_targets(b) for b in micro_batches))
        adv = torch.cat([b["advantages"] for b in micro_batches])
        return float(value), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, adv

    big_loss, big, adv_big = one_step("big", 4, 1)
    small_loss, small, adv_small = one_step("small", 2, 2)
    assert adv_big.abs().max() > 0.1 and torch.allclose(adv_big, adv_small)  # the same completions and rewards
    assert abs(big_loss - small_loss) < 1e-6 and abs(big_loss) > 1e-4
    assert big.keys() == small.keys()
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("loss,mu,beta,corrected", [
    ("grpo", 1, 0.0, True), ("dapo", 1, 0.0, True), ("dr_grpo", 1, 0.0, True),
    ("grpo", 2, 0.04, True), ("dapo", 2, 0.04, False), ("dr_grpo", 3, 0.04, True), ("grpo", 1, 0.04, False)])
def test_loss_and_gradient_equal_trl(tmp_path, loss, mu, beta, corrected):
    """The same rollout (prompts of one length, completions, advantages, old and reference log-probs)
    fed to our loss_sum / count_targets and to TRL's GRPOTrainer._compute_loss, full fine-tuning,
    fp32 (TRL's default bf16 autocast on CPU off), the recipe's temperature 0.7 on both sides (the
    log-probs of logits / T)."""
    pytest.importorskip("trl")
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    trainer = build_trainer(_overrides("peft=none", f"rl.loss={loss}", "rl.epsilon_high=0.28", "rl.temperature=0.7",
                                       f"rl.epochs_per_batch={mu}", f"rl.beta={beta}",
                                       f"rl.kl_bias_correction={corrected}"), tmp_path / "ours")
    model = trainer.acc.unwrap_model(trainer.model)
    _perturb(model)
    pb = _prompt_batch(trainer, _same_prompt_length_rows(trainer, 4))
    P = len(pb["prompts"][0])
    batch = trainer.task.make_rollout(0, [pb])[0]
    g = torch.Generator().manual_seed(3)
    batch["advantages"] = torch.randn(16, generator=g)  # a spread the untrained model's rewards lack
    if mu > 1:
        batch["old_logps"] = batch["old_logps"] + 0.3 * torch.randn(batch["old_logps"].shape, generator=g)
    if beta:
        batch["ref_logps"] = batch["ref_logps"] + 0.2 * torch.randn(batch["ref_logps"].shape, generator=g)
    start = copy.deepcopy(model)
    if beta:  # TRL loads its reference model from the policy's name: the weights before the update
        start.save_pretrained(tmp_path / "start")
        start.config._name_or_path = str(tmp_path / "start")
    model.train()
    ours_loss = trainer.task.loss_sum(model, batch) / trainer.task.count_targets(batch)
    ours_loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=8, loss_type=loss, epsilon=0.2, epsilon_high=0.28, beta=beta,
                      temperature=0.7, num_iterations=mu, use_bias_correction_kl=corrected, bf16=False, report_to=[], use_cpu=True, save_strategy="no")
    try:
        trl = GRPOTrainer(model=start, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 16), processing_class=trainer.tokenizer)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        trained = (batch["labels"][:, P:] != IGNORE).long()

        def grid(flat):
            out = torch.zeros(trained.shape)
            out[trained.bool()] = flat
            return out

        inputs = {"prompt_ids": ids[:, :P], "prompt_mask": mask[:, :P], "completion_ids": ids[:, P:],
                  "completion_mask": trained, "advantages": batch["advantages"], "num_items_in_batch": trained.sum()}
        if mu > 1:
            inputs["old_per_token_logps"] = grid(batch["old_logps"])
        if beta:
            inputs["ref_per_token_logps"] = grid(batch["ref_logps"])
        trl.current_gradient_accumulation_steps = 1
        trl.model.train()
        theirs_loss = trl._compute_loss(trl.model, inputs)
        theirs_loss.backward()
        theirs = dict(trl.model.named_parameters())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert abs(float(ours_loss) - float(theirs_loss)) < 1e-6, (float(ours_loss), float(theirs_loss))
    assert abs(float(ours_loss)) > 1e-3
    worst = max(float((ours[n] - theirs[n].grad).abs().max()) for n in ours)
    assert worst < 1e-5, worst


# ----------------------------------------------------------------------------- rewards
BROKEN = '''
def raises(prompts, completions, **kw):
    raise KeyError("answer")
def short(prompts, completions, **kw):
    return [0.0] * (len(completions) - 1)
def nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)
'''


@pytest.mark.parametrize("fn,expected", [
    ("raises", "reward raises raised KeyError: 'answer' (rollout of data rows"),
    ("short", "reward short returned 31 values for 32 completions"),
    ("nan", "reward nan returned nan for completion 0 of data row"),
])
def test_a_broken_reward_function_is_one_line(tmp_path, fn, expected):
    (tmp_path / "my_rewards.py").write_text(BROKEN)
    result = run_cli(_overrides(f"rl.rewards=[{{_target_: my_rewards.{fn}}}]", "trainer.max_steps=2",
                                "trainer.micro_batch_size=8", f"output_dir={tmp_path / 'run'}"),
                     env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_config_problems_are_reported():
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["recipe=grpo-llm", "rl.loss=ppo", "rl.scale_rewards=rank", "rl.num_generations=1",
                 "rl.epsilon_high=0.1", "rl.engine=vllm", "rl.rewards=[{weight: 1}]", "distributed=fsdp"])
    text = str(err.value)
    for part in ("rl.loss=ppo", "rl.scale_rewards=rank", "rl.num_generations=1", "rl.epsilon_high=0.1",
                 "rl.engine=vllm", "rl.rewards[0] has no _target_", "distributed.strategy=fsdp"):
        assert part in text, part
    with pytest.raises(ConfigError, match="at least one reward function"):
        compose(["recipe=grpo-llm", "rl.rewards=[]"])


def test_model_card_names_the_method_and_rewards(tmp_path):
    from finetune.outputs.model_card import build_card_data, hyperparameter_rows

    config = {"model": {"task": "grpo"}, "peft": {"method": "none"}, "optim": {"lr": 1e-3},
              "rl": {"loss": "dapo", "num_generations": 8, "beta": 0.04,
                     "rewards": [{"_target_": "finetune.rl.rewards.exact_match", "weight": 1.0}]}}
    rows = dict(hyperparameter_rows(config))
    assert rows["method"] == "online RL, rl.loss=dapo" and rows["KL beta"] == 0.04
    assert rows["rewards"] == "finetune.rl.rewards.exact_match x 1.0" and rows["completions per prompt"] == 8
    assert {"grpo", "dapo"} <= set(build_card_data(tmp_path, config).tags)


def test_built_in_rewards():
    from finetune.rl.rewards import exact_match, length_penalty, regex_match

    assert exact_match(["p", "p"], [" ab\n", "ba"], reference=["ab", "ab"]) == [1.0, 0.0]
    assert regex_match(["p"] * 3, ["<answer>4</answer>", "x <answer>4</answer>", "4"],
                       pattern=r"<answer>\d+</answer>") == [1.0, 0.0, 0.0]
    assert regex_match(["p"], ["x <answer>4</answer>"], pattern=r"<answer>\d+</answer>", full=False) == [1.0]
    assert length_penalty(["p"] * 2, ["", ""], completion_ids=[[1, 2], [1, 2, 3, 4, 5, 6]], target_tokens=4) == [0.0, -0.5]


@pytest.mark.slow
def test_a_reward_model_from_reward_llm_scores_like_the_trained_classifier(tmp_path):
    from finetune.rl.rewards import RewardModel, load_sequence_classifier

    run = tmp_path / "rm"
    run_cli(["recipe=reward-llm", "trainer.max_steps=3", "trainer.eval_steps=0", "trainer.micro_batch_size=4",
             f"output_dir={run}"], check=True)
    rm = RewardModel(str(run / "final"))
    prompts, completions = ["<|user|>Give the last letter.\n\ntisu<|end|><|assistant|>"] * 2, ["u", "t"]
    scores = rm(prompts, completions)
    model, tok = load_sequence_classifier(str(run / "final"))
    for p, c, s in zip(prompts, completions, scores):
        ids = tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            direct = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert abs(direct - s) < 1e-5
    assert scores[0] != scores[1]
    bad = run_cli(_overrides(f"rl.rewards=[{{_target_: finetune.rl.rewards.RewardModel, path: {tmp_path / 'none'}}}]",
                             "trainer.max_steps=1", f"output_dir={tmp_path / 'g'}"))
    assert bad.returncode == 3 and "holds no adapter_config.json or config.json" in bad.stderr


# ----------------------------------------------------------------------------- whole runs
def _resume_args(tmp_path):
    return _overrides(LENGTH, "rl.epochs_per_batch=2", "rl.beta=0.04", "rl.scale_rewards=batch",
                      "trainer.max_steps=8", "trainer.log_steps=1", "optim.lr=5e-3",
                      "trainer.eval_steps=8", "trainer.eval_max_batches=1", "trainer.sample_prompts=2",
                      f"data.cache_dir={tmp_path / 'cache'}")


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    """An uninterrupted mu=2 run with the KL term, checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("grpo-ref")
    ref = root / "ref"
    run_cli([*_resume_args(root), "trainer.save_steps=3", f"output_dir={ref}"], check=True)
    return root, ref


KEYS = ("grad_norm", "kl", "clip/region", "reward", "advantage_std", "completion_length")


def _rows(run_dir):
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_cli_run_resumes_bit_identically_inside_a_rollout(grpo_reference, tmp_path):
    """A checkpoint at step 3 lies inside rollout 1 (steps 3-4): the resumed run trains step 4 on the
    saved rollout, then makes rollouts 2 and 3 as the uninterrupted run did."""
    root, ref = grpo_reference
    assert (ref / "checkpoints" / "step-00000003" / "rollout-rank0.pt").is_file()
    assert not (ref / "checkpoints" / "step-00000006" / "rollout-rank0.pt").exists()  # a rollout boundary
    losses = train_losses(ref)
    assert [s for s, _ in losses] == list(range(1, 9))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    run_cli([*_resume_args(root), "resume=auto", f"output_dir={resumed}"], check=True)
    assert train_losses(resumed) == losses[3:]
    assert _rows(resumed) == _rows(ref)[3:]
    assert any(r["kl"] > 0 for r in _rows(ref)) and any(abs(loss) > 1e-6 for _, loss in losses)
    evals = [r for r in read_metrics(ref) if "eval_reward" in r]
    assert evals and "eval_rewards/length_penalty" in evals[-1]
    from PIL import Image

    with Image.open(ref / "loss_curves.png") as img:  # loss, lr and the reward panel
        assert img.size[0] == 1500
    assert "| eval_reward |" in (ref / "report.md").read_text()
    samples = [json.loads(x) for x in (ref / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "completion", "reference", "reward"} <= set(samples[0])


@pytest.mark.slow
def test_sigusr1_exits_75_and_the_resumed_run_equals_the_uninterrupted_one(grpo_reference, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from run_helpers import REPO
    from finetune.errors import EXIT_PREEMPTED

    root, ref = grpo_reference
    run_dir = tmp_path / "preempted"
    args = [*_resume_args(root), "trainer.max_steps=8", f"output_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    (ckpt,) = (run_dir / "checkpoints").glob("step-*")
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped_at < 8
    assert (ckpt / "rollout-rank0.pt").exists() == (stopped_at % 2 == 1)  # inside a rollout: it is saved
    run_cli([*args, "resume=auto"], check=True)
    assert train_losses(run_dir) == train_losses(ref)
    assert _rows(run_dir) == _rows(ref)
