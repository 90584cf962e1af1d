"""finetune vs transformers Trainer + PEFT vs TRL SFTTrainer: LoRA SFT throughput on real data.

Same model (a Llama with random weights saved with ``save_pretrained``: SmolLM2-135M-shaped in the
full mode, the tiny built-in shape in ``--quick``), same tokens (real alpaca data from
/work/shared/data/alpaca-real, chatml template on the GPT-2 BPE tokenizer + added specials, tokenised
by finetune's ``stage=preprocess``; HF and TRL get those token ids from its cache), same LoRA (r16, alpha 32, q/k/v/o/
gate/up/down), micro-batch 4, max 512 tokens, AdamW at the same lr (constant), same steps.

Each run is a fresh process; frameworks alternate within a repeat and the order flips every repeat.
Timing excludes the warm-up steps: finetune's figures come from its metrics.jsonl windows (log_steps
= warm-up), HF's and TRL's from a callback's step-end timestamps; useful tokens are non-padding
tokens (finetune: its ``num_tokens``; HF/TRL: attention-mask sum, or every token when padding-free),
counted per batch by wrapping each framework's collator.

Modes:
- ``packed``: finetune packs (data.packing=true); HF pads per batch with DataCollatorForSeq2Seq
  (its usual path, no length grouping); TRL packs with its default bfd (padding-free).
- ``fixed``: every example exactly L tokens (examples >= L tokens truncated to L), no packing for
  anyone: nothing to gain from padding, so this measures the loop (and the loss path).

Framework ``finetune-plain-loss`` (A/B only): finetune with ``trainer.chunked_loss=off`` (the
logits kept, as before finetune/linear_cross_entropy.py; on CPU ``auto`` means on).
Frameworks ``finetune-bf16`` / ``hf-bf16`` / ``trl-bf16``: the same run with bf16 autocast on CPU
(``trainer.precision=bf16``; HF/TRL ``bf16=True``), fp32 weights and optimizer on every side; each
is compared with its own fp32 run and with the other frameworks' bf16 runs.

    python bench/vs_hf.py --quick            # tiny model, 4 steps x 6 runs (20 min at load ~12 on 2 cores)
    python bench/vs_hf.py                    # SmolLM2-135M shape (slow on 2 CPU cores)
    python bench/vs_hf.py --shape llama-32m --modes packed --frameworks finetune,finetune-bf16,hf,hf-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, finetune_entry, median, print_machine, read_jsonl, run_child, table  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SHAPES = {  # SmolLM2-135M's shape (its vocab is 49152; here the GPT-2 BPE + 3 specials = 50260)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # The issue-20 32M Llama (hidden 384, 8 layers): head-heavy, the GPT-2 vocab is most of its weights
    "llama-32m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
LR, R, ALPHA, MB, SEED = 2e-4, 16, 32, 4, 42
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ setup (parent process)
def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizer-gpt2" / "tokenizer.json"),
                                  model_max_length=4096)
    tok.add_special_tokens({"pad_token": "<|pad|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def save_model(shape: str, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rope_theta=10000.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      **SHAPES[shape])
    torch.manual_seed(SEED)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def alpaca_rows() -> list[dict]:
    rows = []
    for name in ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        rows += json.loads((SHARED / "alpaca-real" / name).read_text())
    # 2 code-alpaca rows have an empty output: finetune rejects them (data.on_bad_example=error).
    return [r for r in rows if r["instruction"].strip() and r["output"].strip()]


def finetune_tokens(work: Path, info: dict, mode: str, max_len: int) -> tuple[list, list]:
    """finetune's own tokens for ``<mode>.jsonl`` (``stage=preprocess``, read from its cache):
    HF and TRL train on exactly these ids and labels."""
    import numpy as np

    cache = work / f"cache-{mode}"
    cmd = finetune_cmd(work, info, mode, 1, 1, max_len, work / "pre", stage="preprocess")
    cmd = [c for c in cmd if not c.startswith(("data.max_seq_len=", "data.cache_dir="))]
    code, _, _ = run_child(cmd + [f"data.max_seq_len={max_len}", f"data.cache_dir={cache}"],
                           log=work / f"log-preprocess-{mode}.txt")
    if code:
        raise SystemExit(f"finetune stage=preprocess failed; see {work / f'log-preprocess-{mode}.txt'}")
    (npz,) = list(cache.glob("data/*/train.npz"))
    z = np.load(npz)
    ids, labels, off = z["ids"], z["labels"], z["offsets"]
    return ([ids[a:b].tolist() for a, b in zip(off[:-1], off[1:])],
            [labels[a:b].tolist() for a, b in zip(off[:-1], off[1:])])


def prepare(work: Path, shape: str, fixed_len: int) -> dict:
    """Model dir, per-mode jsonl (finetune's input) and finetune's tokens of it (HF/TRL input)."""
    import shutil

    model_dir = work / f"model-{shape}"
    if not (model_dir / "config.json").exists():
        save_model(shape, model_dir)
    info = {"model": str(model_dir)}
    for d in work.glob("cache-*"):
        shutil.rmtree(d)
    rows = alpaca_rows()
    (work / "packed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, labels = finetune_tokens(work, info, "packed", 512)
    (work / "packed.tokens.json").write_text(json.dumps({"input_ids": ids, "labels": labels}))
    # Fixed length: examples of >= L tokens with a target among their first L, cut to L by finetune.
    (work / "long.jsonl").write_text((work / "packed.jsonl").read_text())
    long_ids, long_labels = finetune_tokens(work, info, "long", 100_000)
    assert len(long_ids) == len(rows)  # nothing dropped: indices match the rows
    keep = [i for i, (x, y) in enumerate(zip(long_ids, long_labels))
            if len(x) >= fixed_len and any(t != -100 for t in y[1:fixed_len])]
    (work / "fixed.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in keep))
    fids, flabels = finetune_tokens(work, info, "fixed", fixed_len)
    assert len(fids) == len(keep) and all(len(x) == fixed_len for x in fids)
    (work / "fixed.tokens.json").write_text(json.dumps({"input_ids": fids, "labels": flabels}))
    info["n_packed"], info["n_fixed"] = len(ids), len(keep)
    return info


# ------------------------------------------------------------------ workers (fresh processes)
class CountingCollator:
    """Wraps a framework's collator; records useful (non-padding) and total tokens per batch."""

    def __init__(self, inner, sink: list):
        self.inner, self.sink = inner, sink

    def __call__(self, features):
        b = self.inner(features)
        total = int(b["input_ids"].numel())
        useful = int(b["attention_mask"].sum()) if "attention_mask" in b else total  # padding-free: no pad
        self.sink.append((useful, total))
        return b


def worker(kind: str, work: Path, mode: str, steps: int, warmup: int, fixed_len: int) -> None:
    kind, bf16 = kind.removesuffix("-bf16"), kind.endswith("-bf16")
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(SEED)
    model_dir = work / f"model-{os.environ['BENCH_SHAPE']}"
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = json.loads((work / f"{mode}.tokens.json").read_text())
    ds = datasets.Dataset.from_dict({"input_ids": data["input_ids"], "labels": data["labels"],
                                     "attention_mask": [[1] * len(x) for x in data["input_ids"]]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    max_len = 512 if mode == "packed" else fixed_len
    common = dict(output_dir=str(work / f"out-{kind}"), per_device_train_batch_size=MB, max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, optim="adamw_torch", logging_steps=steps, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=SEED, dataloader_num_workers=0, use_cpu=True,
                  bf16=bf16, fp16=False)  # as finetune's run (TRL's SFTConfig defaults to bf16)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    if kind == "hf":
        from peft import get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        trainer = Trainer(model=get_peft_model(model, lora), args=TrainingArguments(**common),
                          train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                          callbacks=[Stamp()])
    else:
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(**common, max_length=max_len, packing=mode == "packed")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds.remove_columns("attention_mask"),
                             processing_class=tok, peft_config=lora, callbacks=[Stamp()])
    counts: list = []
    trainer.data_collator = CountingCollator(trainer.data_collator, counts)
    trainer.train()
    # Batches are collated in step order (the loader may run one ahead): step i used counts[i-1].
    timed = counts[warmup:steps]
    seconds = stamps[steps - 1] - stamps[warmup - 1]
    useful, total = sum(u for u, _ in timed), sum(t for _, t in timed)
    print("RESULT " + json.dumps({"useful_tok_s": useful / seconds, "step_s": seconds / (steps - warmup),
                                  "pad_frac": 1 - useful / total, "timed_steps": steps - warmup}), flush=True)


def finetune_cmd(work: Path, info: dict, mode: str, steps: int, warmup: int, fixed_len: int,
                 out: Path, stage: str = "train", plain_loss: bool = False, bf16: bool = False) -> list[str]:
    max_len = 512 if mode == "packed" else fixed_len
    return [*finetune_entry(), "recipe=lora-llm", f"trainer.chunked_loss={'off' if plain_loss else 'auto'}",
            f"trainer.precision={'bf16' if bf16 else 'fp32'}", "model=smollm2-135m",
            f"model.name_or_path={info['model']}", "model.dtype=float32", "model.attn_implementation=sdpa",
            f"data.path={work / (mode + '.jsonl')}", "data.format=alpaca", "data.eval_size=0",
            "data.eval_split=null", f"data.max_seq_len={max_len}",
            f"data.packing={'true' if mode == 'packed' else 'false'}", f"data.cache_dir={work / ('cache-' + mode)}",
            f"peft.r={R}", f"peft.alpha={ALPHA}", "peft.dropout=0.0", f"optim.lr={LR}",
            "optim.warmup_steps=0", "optim.warmup_ratio=0.0", "optim.scheduler=constant",
            "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", f"trainer.max_steps={steps}",
            f"trainer.micro_batch_size={MB}", "trainer.grad_accum=1", f"trainer.log_steps={warmup}",
            "trainer.eval_steps=0", "trainer.save_steps=0", "trainer.sample_prompts=0",
            "trainer.progress=false", "logger.plots=false", f"seed={SEED}", f"output_dir={out}",
            f"stage={stage}"]


def finetune_result(out: Path, warmup: int) -> dict:
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
    prev, tokens, seconds, n = 0, 0.0, 0.0, 0
    for r in rows:
        k = r["step"] - prev
        if prev >= warmup:  # windows after the warm-up window
            seconds += r["step_time_s"] * k
            tokens += r["tokens_per_s"] * r["step_time_s"] * k
            n += k
        prev = r["step"]
    return {"useful_tok_s": tokens / seconds, "step_s": seconds / n, "timed_steps": n}


def run_one(kind: str, work: Path, info: dict, mode: str, a) -> dict:
    log = work / f"log-{kind}-{mode}.txt"
    env = {"BENCH_SHAPE": a.shape, "TOKENIZERS_PARALLELISM": "false"}
    if kind.startswith("finetune"):
        out = work / f"run-{mode}" if kind == "finetune" else work / f"run-{kind}-{mode}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        code, wall, rss = run_child(finetune_cmd(work, info, mode, a.steps, a.warmup, a.fixed_len, out,
                                                 plain_loss=kind == "finetune-plain-loss",
                                                 bf16=kind == "finetune-bf16"), env=env, log=log)
        if code:
            raise SystemExit(f"finetune failed ({code}); see {log}")
        res = finetune_result(out, a.warmup)
    else:
        cmd = [sys.executable, __file__, "--worker", kind, "--work", str(work), "--mode", mode,
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--fixed-len", str(a.fixed_len)]
        code, wall, rss = run_child(cmd, env=env, log=log)
        lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
        if code or not lines:
            raise SystemExit(f"{kind} failed ({code}); see {log}")
        res = json.loads(lines[-1][7:])
    res.update(wall_s=wall, rss_mib=rss, load=os.getloadavg()[0])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps (2 warm-up), one repeat")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--steps", type=int, default=None, help="total steps per run (warm-up included)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--modes", default="packed,fixed")
    p.add_argument("--fixed-len", type=int, default=128)
    p.add_argument("--frameworks", default="finetune,hf,trl")
    p.add_argument("--work", default=None, help="work dir (default: a temp dir)")
    p.add_argument("--worker", choices=["hf", "trl", "hf-bf16", "trl-bf16"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, Path(a.work), a.mode, a.steps, a.warmup, a.fixed_len)
    quick = dict(shape="tiny", steps=4, warmup=2, repeats=1)
    full = dict(shape="smollm2-135m", steps=8, warmup=2, repeats=2)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if (a.steps - a.warmup) % a.warmup:
        raise SystemExit("--steps minus --warmup must be a multiple of --warmup (finetune logs every "
                         "--warmup steps; its first window is the warm-up)")
    print_machine(f"finetune vs HF Trainer vs TRL SFTTrainer, LoRA r{R}, shape={a.shape}, mb={MB}, "
                  f"steps={a.steps} (warm-up {a.warmup} excluded), repeats={a.repeats}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-vs-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, a.shape, a.fixed_len)
    print(f"# data: {info['n_packed']} alpaca examples (<=512 tokens); fixed mode: {info['n_fixed']} "
          f"examples cut to {a.fixed_len} tokens; work dir {work}", flush=True)
    kinds = a.frameworks.split(",")
    for mode in a.modes.split(","):
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for rep in range(a.repeats):
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                r = run_one(kind, work, info, mode, a)
                results[kind].append(r)
                print(f"  {mode} rep {rep} {kind:8s} useful tok/s {r['useful_tok_s']:9.1f}  step "
                      f"{r['step_s']:.3f}s  rss {r['rss_mib']:.0f} MiB  load {r['load']:.2f}", flush=True)
        report(mode, results, a)


def report(mode: str, results: dict, a) -> None:
    rows = []
    for kind, rs in results.items():
        row = {"framework": kind, "tok_s": median([r["useful_tok_s"] for r in rs]),
               "step_s": median([r["step_s"] for r in rs]), "rss": max(r["rss_mib"] for r in rs),
               "pad": median([r["pad_frac"] for r in rs]) if "pad_frac" in rs[0] else None,
               "runs": len(rs)}
        rows.append(row)
    print(f"\n## mode={mode} ({'packing on' if mode == 'packed' else f'packing off, every example {a.fixed_len} tokens'})")
    print(table(rows, [("framework", "framework", ""), ("tok_s", "useful tok/s (median)", ",.0f"),
                       ("step_s", "step s (median)", ".3f"), ("rss", "peak RSS MiB (max)", ",.0f"),
                       ("pad", "padding fraction", ".3f"), ("runs", "runs", "")]))
    pairs = [("finetune", o) for o in ("finetune-plain-loss", "hf", "trl")]
    pairs += [(f"{k}-bf16", k) for k in ("finetune", "hf", "trl")]  # bf16 autocast vs its own fp32 run
    pairs += [("finetune-bf16", o) for o in ("hf-bf16", "trl-bf16")]  # at equal precision
    for mine, other in pairs:
        if mine in results and other in results:
            print(ratio_line(mode, mine, other, results), flush=True)


def ratio_line(mode: str, mine: str, other: str, results: dict) -> str:
    a, b = results[mine], results[other]
    pairs = [x["useful_tok_s"] / y["useful_tok_s"] for x, y in zip(a, b)]
    ratio = median([r["useful_tok_s"] for r in a]) / median([r["useful_tok_s"] for r in b])
    rss = max(r["rss_mib"] for r in a) / max(r["rss_mib"] for r in b)
    line = (f"{mine}/{other}: useful tok/s {ratio:.2f}x (per repeat: "
            f"{', '.join(f'{x:.2f}' for x in pairs)}), peak RSS {rss:.2f}x")
    if other in ("hf", "hf-bf16") and mine.startswith("finetune"):
        pad = median([r["pad_frac"] for r in b])
        target = 2.0 if mode == "packed" else 1.0
        line += (f"; padding-free limit 1/(1-{other} padding) = {1 / (1 - pad):.2f}x; target >= {target}x: "
                 f"{'MET' if ratio >= target else 'NOT MET'}; RSS <= {other}: {'MET' if rss <= 1 else 'NOT MET'}")
    return line

if __name__ == "__main__":
    main()
