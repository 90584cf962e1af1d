"""Real data end to end: ``dpo-llm`` and ``reward-llm`` on dpo_en_demo.json, ``kto-llm`` on
kto_en_demo.json, with a real vocabulary and a real chat template (issue 15's "must show").

Data: /work/shared/data/preference-real/dpo_en_demo.json (300 pairs, LLaMA-Factory's sharegpt ranking
layout) and /work/shared/data/chat-real/kto_en_demo.json (300 messages + boolean label). Model: a
Llama with random weights (hidden 256, 4 layers, tied embeddings by default) saved with
``save_pretrained`` beside the GPT-2 BPE vocabulary (/work/shared/data/tokenizer-gpt2) plus the
special tokens of a real family from /work/shared/data/chat-templates-real (default SmolLM2-Instruct:
ChatML with its own default system prompt, pad = eos = ``<|im_end|>``). The tokenizer is saved WITHOUT
a template: each run gets the family's JSON file as ``model.chat_template=<file>``, the path users
take for a model whose template they pass.

Each run is ``python -m finetune recipe=<r> data.path=<real file> ...`` in a fresh process; the
script checks exit 0 and no traceback, then prints rows kept / bad / truncated (data_stats.json,
train + eval), the first and last train loss, reward accuracy (DPO and reward model: the last train
row's and the eval's), KTO's last ``kl`` and ``rewards/margin``, and the wall time. ``--precompute``
adds a ``kto-llm`` run with ``pref.precompute_ref=true`` (same seed: its losses must equal the live
run's to 1e-4; its reference pass covers all ~300 rows x 2 sequences, so on 2 cores it takes several
times a 10-step run). Once, ``stage=inspect`` on the KTO data: exit 0 and zero template warnings.

    python bench/real_preference_runs.py                 # ~1-2 min a run on 2 cores
    python bench/real_preference_runs.py --steps 2 --max-len 256 --only kto-llm --precompute   # a quick look
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, print_machine, read_jsonl, run_child, table  # noqa: E402

DPO_DATA = SHARED / "preference-real" / "dpo_en_demo.json"
KTO_DATA = SHARED / "chat-real" / "kto_en_demo.json"
TEMPLATES = SHARED / "chat-templates-real"
RUNS = {  # name -> (recipe, data file, extra overrides)
    "dpo-llm": ("dpo-llm", DPO_DATA, []),
    "kto-llm": ("kto-llm", KTO_DATA, []),
    "kto-llm+precompute": ("kto-llm", KTO_DATA, ["pref.precompute_ref=true"]),
    "reward-llm": ("reward-llm", DPO_DATA, []),
}


def build_model(out: Path, family: str, layers: int, hidden: int) -> dict:
    """GPT-2 BPE + the family's special tokens (no template saved) and a random Llama; returns the family's JSON."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    fam = json.loads((TEMPLATES / f"{family}.json").read_text())
    if fam.get("stand_in_base") != "gpt2":
        raise SystemExit(f"{family}: its vocabulary is {fam.get('stand_in_base')!r}, "
                         "not the GPT-2 BPE this script builds")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizer-gpt2" / "tokenizer.json"),
                                  model_max_length=4096)
    vocab = tok.get_vocab()
    tok.add_special_tokens({"additional_special_tokens": [t for t in fam["specials"] if t not in vocab]})
    for role in ("bos", "eos", "pad", "unk"):
        if fam.get(f"{role}_token"):
            setattr(tok, f"{role}_token", fam[f"{role}_token"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=True,
                      max_position_embeddings=2048, rope_theta=10000.0, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return fam


def common_overrides(args, work: Path) -> list[str]:
    return [f"model.name_or_path={work / 'model'}", f"model.chat_template={TEMPLATES / (args.family + '.json')}",
            "data.eval_split=null", f"data.eval_size={args.eval_size}", f"data.max_seq_len={args.max_len}",
            f"data.cache_dir={work / 'cache'}", f"trainer.max_steps={args.steps}",
            f"trainer.micro_batch_size={args.mb}", "trainer.log_steps=1", f"trainer.eval_steps={args.steps}",
            "trainer.save_steps=0", "trainer.sample_prompts=0", "trainer.progress=false", "logger.plots=false",
            "optim.warmup_steps=2", "seed=42"]


def check_log(name: str, code: int, log: Path) -> str:
    text = log.read_text()
    if code != 0 or "Traceback" in text:
        raise SystemExit(f"{name}: exit {code}{' with a traceback' if 'Traceback' in text else ''}; "
                         f"see {log}\n{text[-3000:]}")
    return text


def one_run(name: str, args, work: Path) -> dict:
    recipe, data, extra = RUNS[name]
    out = work / f"run-{name}"
    cmd = [sys.executable, "-m", "finetune", f"recipe={recipe}", f"data.path={data}",
           *common_overrides(args, work), *extra, f"output_dir={out}"]
    code, wall, rss = run_child(cmd, log=work / f"log-{name}.txt")
    check_log(name, code, work / f"log-{name}.txt")
    stats = json.loads((out / "data_stats.json").read_text())
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    tr, ev = stats["train"], stats.get("eval") or {}
    result = {"run": name, "read": tr.get("read"), "kept": f"{tr['kept']} + {ev.get('kept', 0)}",
              "bad": tr.get("skipped_bad", 0) + ev.get("skipped_bad", 0),
              "truncated": tr.get("truncated", 0) + ev.get("truncated", 0),
              "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
              "eval_loss": evals[-1]["eval_loss"] if evals else None,
              "acc": train[-1].get("rewards/accuracy"),
              "eval_acc": evals[-1].get("eval_rewards/accuracy") if evals else None,
              "kl": train[-1].get("kl"), "margin": train[-1].get("rewards/margin"),
              "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train), "wall_s": wall, "rss": rss,
              "losses": [r["loss"] for r in train]}
    assert [r["step"] for r in train] == list(range(1, args.steps + 1)), (name, [r["step"] for r in train])
    return result


def read_metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def inspect_kto(args, work: Path) -> tuple[int, list[str]]:
    """stage=inspect on the KTO data: (template warnings, the warning lines)."""
    cmd = [sys.executable, "-m", "finetune", "recipe=kto-llm", "stage=inspect", f"data.path={KTO_DATA}",
           *common_overrides(args, work), f"output_dir={work / 'inspect'}"]
    code, wall, _ = run_child(cmd, log=work / "log-inspect.txt")
    text = check_log("stage=inspect", code, work / "log-inspect.txt")
    found = re.search(r"\((\d+) template warnings?\)", text)
    if not found or not (work / "inspect" / "inspect.html").is_file():
        raise SystemExit(f"stage=inspect: no inspect.html / warning count; see {work / 'log-inspect.txt'}")
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    print(f"stage=inspect (kto-llm, kto_en_demo.json): exit 0 in {wall:.0f} s, "
          f"{found.group(1)} template warnings", flush=True)
    for line in text.splitlines():
        if re.search(r"(kept|truncated|tokens|length)", line) and "INFO" in line and "inspect" not in line:
            print("   ", line.split("] ", 1)[-1][:160])
    return int(found.group(1)), warnings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="smollm2-instruct", help="a chat-templates-real family on the GPT-2 vocabulary")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--eval-size", type=int, default=16)
    ap.add_argument("--only", default="dpo-llm,kto-llm,reward-llm", help="comma list of: dpo-llm, kto-llm, reward-llm")
    ap.add_argument("--precompute", action="store_true", help="also kto-llm with pref.precompute_ref=true")
    ap.add_argument("--work", help="keep the model, cache and run dirs here (default: a temporary dir)")
    args = ap.parse_args()
    print_machine(f"real preference data end to end: {args.family} template, GPT-2 BPE, "
                  f"Llama {args.layers} x {args.hidden}, max {args.max_len}, mb {args.mb}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        fam = build_model(work / "model", args.family, args.layers, args.hidden)
        print(f"# tokenizer: GPT-2 BPE + {fam['family']} specials (eos {fam['eos_token']}, pad {fam['pad_token']}); "
              f"template: model.chat_template={TEMPLATES / (args.family + '.json')}", flush=True)
        warnings, lines = inspect_kto(args, work)
        results = []
        for name in args.only.split(",") + (["kto-llm+precompute"] if args.precompute else []):
            results.append(one_run(name, args, work))
            r = results[-1]
            print(f"{name}: exit 0, {r['wall_s']:.0f} s, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}",
                  flush=True)
        print(table(results, [("run", "run", ""), ("read", "records read", ""), ("kept", "kept train + eval", ""),
                              ("bad", "bad", ""), ("truncated", "truncated", ""), ("first_loss", "first loss", ".4f"),
                              ("last_loss", "last loss", ".4f"), ("eval_loss", "eval loss", ".4f"),
                              ("acc", "rewards/accuracy (last step)", ".3f"), ("eval_acc", "eval accuracy", ".3f"),
                              ("kl", "kl (last step)", ".4f"), ("margin", "rewards/margin", ".4f"),
                              ("tokens_per_s", "tokens/s", ".0f"), ("wall_s", "wall s", ".0f"),
                              ("rss", "peak RSS MiB", ".0f")]))
        by = {r["run"]: r for r in results}
        if "kto-llm" in by and "kto-llm+precompute" in by:
            diff = max(abs(a - b) for a, b in zip(by["kto-llm"]["losses"], by["kto-llm+precompute"]["losses"]))
            print(f"kto-llm live vs precomputed reference: max |loss difference| over {args.steps} steps {diff:.2e}")
            if diff > 1e-4:
                raise SystemExit("the precomputed reference changed the KTO losses")
        if warnings:
            print("template warnings:\n" + "\n".join(lines))
            raise SystemExit(f"stage=inspect: {warnings} template warnings")
    print(f"load after: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
