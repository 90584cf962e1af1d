"""finetune recipe=grpo-llm vs TRL's GRPOTrainer: optimizer steps/s and the generation / training split.

Both sides train the same model dir (``--shape builtin``: the recipe's built-in tiny Llama, 4 layers,
char tokenizer + chat template, made from finetune/model/builtin.py with seed 42 and saved with
``save_pretrained``; ``--shape 135m``: a random-weight SmolLM2-135M-shaped Llama with the GPT-2 BPE
+ chatml specials, bench/vs_hf.py) on the same prompts (finetune/data/sample/instructions-train.jsonl,
alpaca; finetune reads the file itself with its ``data=sample`` default; TRL gets conversational
prompts ``[{"role": "user", "content": instruction + "\\n\\n" + input}]``, the user text finetune's
alpaca -> chat conversion makes (finetune/data/formats.py), and a ``reference`` column = output).
The prompt token ids are checked equal: the prompts finetune's PromptCollator yields and the ones
TRL's ``_tokenize_prompts`` gives to generate (the first batch of each) must both be the chat
template rendering (``add_generation_prompt=True``) of a record, with that record's answer.

Matched: G = 8 completions per prompt, 8 prompts per step (finetune ``trainer.micro_batch_size=8``
prompts; TRL ``per_device_train_batch_size=64`` completions, ``steps_per_generation=1``,
``num_iterations=1``), max 16 new tokens, temperature 0.7, top_p 1, top_k off, HF ``generate`` with
the KV cache on the training model, reward = exact match of the stripped completion (special tokens
skipped) vs the stripped reference, group-normalised advantages, ``loss=grpo`` (per-completion
token mean), beta 0 (no reference pass), LoRA r 8 / alpha 16 / dropout 0 on q/k/v/o/gate/up/down
ONLY (the model is given as a local dir, so finetune does not train embed_tokens + lm_head in full
as it does for ``builtin:tiny-llama``; TRL trains the same LoRA weights), AdamW lr 1e-3 constant, no
warmup, weight decay 0, grad clip 1.0, fp32, no gradient checkpointing, no eval, no checkpoints
inside the run, dataloader workers 0, seed 42.

Differs: the prompt order (each side shuffles with its own sampler), the sampler's random streams
(finetune: per-row seeded Gumbel-max; TRL: ``do_sample`` with the global generator), so rewards and
completion lengths are equal in distribution, not draw by draw (both are printed); the random-weight
model rarely emits EOS, so most completions run to the 16-token limit on both sides. finetune
writes its final adapter after the last step (outside the timed steps); TRL saves nothing.

Timing: steps after the first ``--warmup``. finetune: its metrics.jsonl windows (``log_steps`` =
warmup): steps/s from ``step_time_s``, generation = the ``generation_s`` sums (generate + decode +
score + advantages, per rank), training = the rest of the step. TRL: ``time.perf_counter()`` at each
``on_step_end``; generation = a timer around ``_generate_and_score_completions`` (its profiling
contexts report only to wandb / mlflow / trackio, not to the log), training = the rest. Each
framework runs in a fresh process, ``--repeats`` times with the order flipped each repeat; medians.
RSS = the child's peak resident set (ru_maxrss).

    python bench/vs_trl_grpo.py --steps 12 --warmup 3 --repeats 1     # quick: a few minutes
    python bench/vs_trl_grpo.py                                       # 40 steps, 3 repeats
    python bench/vs_trl_grpo.py --shape 135m --steps 10 --warmup 2    # a SmolLM2-135M-shaped model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_as_child, median, print_machine, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "finetune" / "data" / "sample" / "instructions-train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
G, PROMPTS, NEW_TOKENS, TEMPERATURE, LR, SEED = 8, 8, 16, 0.7, 1e-3, 42
CHECKED = 8  # prompts of the first batch whose token ids are checked on each side

# finetune's entry with one wrapper: the first PromptCollator call's prompts and references are
# written to $BENCH_PROMPTS (for the token-id check); everything else is `python -m finetune`.
CAPTURE = """
import json, os
import finetune.tasks.grpo as g
_call = g.PromptCollator.__call__
def _capture(self, rows):
    out = _call(self, rows)
    path = os.environ['BENCH_PROMPTS']
    if not os.path.exists(path):
        with open(path, 'w') as fh:
            json.dump({'prompts': out['prompts'], 'references': out['references']}, fh)
    return out
g.PromptCollator.__call__ = _capture
import runpy
runpy.run_module('finetune', run_name='__main__', alter_sys=True)
"""


def save_model(shape: str, out: Path) -> None:
    if shape == "135m":
        from vs_hf import save_model as save_135m

        save_135m("smollm2-135m", out)
        return
    import torch
    from transformers import LlamaForCausalLM

    from finetune.model import builtin

    tok = builtin.tiny_chat_tokenizer()
    torch.manual_seed(SEED)
    LlamaForCausalLM(builtin.tiny_llama_config(len(tok), tok.pad_token_id, tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)


def records() -> list[dict]:
    """The shipped prompts as TRL gets them: the user text of finetune's alpaca -> chat conversion."""
    rows = []
    for r in read_jsonl(DATA):
        extra = r.get("input") or ""
        user = f"{r['instruction']}\n\n{extra}" if extra.strip() else r["instruction"]
        rows.append({"prompt": [{"role": "user", "content": user}], "reference": r["output"]})
    return rows


def child_ours(args, work: Path) -> dict:
    out = work / f"ours-{time.time_ns()}"
    cmd = [sys.executable, "-c", CAPTURE, "recipe=grpo-llm", f"model.name_or_path={work / 'model'}",
           "model.dtype=float32", "data.eval_split=null", "data.eval_size=0", f"data.cache_dir={work / 'cache'}",
           f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={PROMPTS}", "trainer.grad_accum=1",
           f"trainer.log_steps={args.warmup}", "trainer.eval_steps=0", "trainer.save_steps=0",
           "trainer.progress=false", "trainer.exact_match_prompts=0", "trainer.sample_prompts=0",
           "trainer.precision=fp32", "trainer.num_workers=0", "logger.plots=false",
           f"optim.lr={LR}", "optim.scheduler=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0.0",
           "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", "peft.r=8", "peft.alpha=16", "peft.dropout=0.0",
           f"rl.num_generations={G}", f"rl.max_new_tokens={NEW_TOKENS}", f"rl.temperature={TEMPERATURE}",
           "rl.top_p=1.0", "rl.top_k=0", "rl.beta=0.0", "rl.loss=grpo", "rl.epochs_per_batch=1",
           f"seed={SEED}", f"output_dir={out}"]
    prompts_file = work / f"ours-prompts-{time.time_ns()}.json"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "BENCH_PROMPTS": str(prompts_file)})
    if proc.returncode:
        raise SystemExit(f"finetune failed:\n{proc.stderr[-3000:]}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "generation_s" in r]
    prev, steps, seconds, gen, reward, length = 0, 0, 0.0, 0.0, [], []
    for r in rows:
        n = r["step"] - prev
        if prev >= args.warmup:  # the windows after the warm-up window
            steps += n
            seconds += r["step_time_s"] * n
            gen += r["generation_s"]
        reward.append((r["reward"], n))
        length.append((r["completion_length"], n))
        prev = r["step"]
    captured = json.loads(prompts_file.read_text())
    return {"steps_per_s": steps / seconds, "gen_s_per_step": gen / steps, "train_s_per_step": (seconds - gen) / steps,
            "reward": sum(v * n for v, n in reward) / sum(n for _, n in reward),
            "completion_length": sum(v * n for v, n in length) / sum(n for _, n in length),
            "prompts": captured["prompts"][:CHECKED], "references": captured["references"][:CHECKED]}


def child_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    stamps, gen_spans, captured = [], [], {}

    def exact_match(prompts, completions, reference, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(t.strip() == r.strip()) for t, r in zip(texts, reference)]

    class Timing(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                gen_spans.append((len(stamps), time.perf_counter() - t0))  # (steps done before, seconds)

        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            if not captured:
                captured["prompts"] = [list(map(int, p)) for p in out[0][:CHECKED * G:G]]
            return out

    cfg = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                     steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
                     temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", scale_rewards="group",
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, max_steps=args.steps, logging_steps=args.warmup, report_to=[],
                     save_strategy="no", eval_strategy="no", bf16=False, fp16=False, use_cpu=True, seed=SEED,
                     gradient_checkpointing=False, dataloader_num_workers=0, log_completions=False)
    trainer = Timed(model=model, reward_funcs=exact_match, args=cfg, train_dataset=Dataset.from_list(records()),
                    processing_class=tok, peft_config=lora, callbacks=[Timing()])
    trainer.train()
    t0, t1 = stamps[args.warmup - 1], stamps[-1]
    steps = len(stamps) - args.warmup
    gen = sum(s for before, s in gen_spans if before >= args.warmup)
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return {"steps_per_s": steps / (t1 - t0), "gen_s_per_step": gen / steps,
            "train_s_per_step": ((t1 - t0) - gen) / steps,
            "reward": sum(r["reward"] for r in logs) / max(len(logs), 1),
            "completion_length": sum(r.get("completions/mean_length", 0.0) for r in logs) / max(len(logs), 1),
            "prompts": captured.get("prompts", [])}


def check_prompts(work: Path, results: dict) -> None:
    """Both sides' first prompts must be a record's chat-template rendering (generation prompt on)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    rendered: dict = {}
    for r in records():
        ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        rendered.setdefault(tuple(ids["input_ids"]), set()).add(r["reference"])
    ours, trl = results["ours"][0], results["trl"][0]
    for k, ids in enumerate(ours["prompts"]):
        assert tuple(ids) in rendered, f"finetune prompt {k} is no record's chat-template rendering: {tok.decode(ids)!r}"
        ref = tok.decode(ours["references"][k], skip_special_tokens=True)
        assert ref in rendered[tuple(ids)], f"finetune prompt {k}: reference {ref!r} is not its record's answer"
    for k, ids in enumerate(trl["prompts"]):
        assert tuple(ids) in rendered, f"TRL prompt {k} is no record's chat-template rendering: {tok.decode(ids)!r}"
    assert ours["prompts"] and trl["prompts"], "a side captured no prompts"
    print(f"prompt ids: {len(ours['prompts'])} finetune + {len(trl['prompts'])} TRL first-batch prompts = the "
          f"template rendering of a record; e.g. finetune {ours['prompts'][0][:12]}... = "
          f"{tok.decode(ours['prompts'][0])!r}, TRL {tok.decode(trl['prompts'][0])!r}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["builtin", "135m"], default="builtin")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be > --warmup")
    if args.child:
        run_as_child(child_ours if args.child == "ours" else child_trl, args, Path(args.work))
        return
    print_machine(f"GRPO: finetune vs TRL, {args.shape}, {PROMPTS} prompts x G {G}, {NEW_TOKENS} new tokens, "
                  f"T {TEMPERATURE}, LoRA r8 (no embed / lm_head), {args.steps} steps ({args.warmup} warm-up)")
    results: dict = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(args.shape, Path(tmp) / "model")
        for rep in range(args.repeats):
            for name in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                cmd = [sys.executable, __file__, "--child", name, "--work", tmp, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name].append(r)
                print(f"repeat {rep + 1} {name:4s}: {r['steps_per_s']:.3f} steps/s, generation "
                      f"{r['gen_s_per_step']:.3f} s/step, training {r['train_s_per_step']:.3f} s/step, reward "
                      f"{r['reward']:.3f}, completion length {r['completion_length']:.1f}, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            if rep == 0:
                check_prompts(Path(tmp), results)
    med = {k: {m: median([r[m] for r in v]) for m in ("steps_per_s", "gen_s_per_step", "train_s_per_step", "reward",
                                                       "completion_length", "peak_rss_mib")}
           for k, v in results.items()}
    for name in ("ours", "trl"):
        m = med[name]
        share = m["gen_s_per_step"] / (m["gen_s_per_step"] + m["train_s_per_step"])
        print(f"{name:4s} steps/s {m['steps_per_s']:7.3f}   generation {m['gen_s_per_step']:6.3f} s/step "
              f"({share:4.0%})   training {m['train_s_per_step']:6.3f} s/step   peak RSS {m['peak_rss_mib']:6.0f} MiB"
              f"   reward {m['reward']:.3f}   completion length {m['completion_length']:.1f}")
    o, t = med["ours"], med["trl"]
    print(f"ratio ours/TRL: {o['steps_per_s'] / t['steps_per_s']:.2f}x steps/s (target >= 1.5x); generation "
          f"{t['gen_s_per_step'] / o['gen_s_per_step']:.2f}x faster, training "
          f"{t['train_s_per_step'] / o['train_s_per_step']:.2f}x faster; "
          f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x TRL peak RSS")
    print(f"load after: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
