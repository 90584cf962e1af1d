"""Data pipeline throughput on one core: format + tokenise (chat template, loss mask, EOS) + pack,
in tokens/s, beside the raw speed of the same tokenizer's batch encode of the same rendered texts.

    python bench/data_throughput.py [--repeat 3] [--max-seq-len 1024]

Data: /work/shared/data/alpaca-real/{alpaca_en_demo,code_alpaca_2k}.json (alpaca format).
Tokenizer: GPT-2's BPE (/work/shared/data/tokenizer-gpt2/tokenizer.json) with ChatML specials and
a ChatML template whose turns end "<|im_end|>\\n" (like Qwen). The pipeline runs through the
same functions ``prepare_data`` uses (no cache, no disk).
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from finetune.config import RunConfig  # noqa: E402
from finetune.data import _encode, _format_all  # noqa: E402
from finetune.data.packing import pack_examples  # noqa: E402
from finetune.data.sources import Record  # noqa: E402
from finetune.data.tokenize import Stats  # noqa: E402

SHARED = Path("/work/shared/data")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_file(str(SHARED / "tokenizer-gpt2" / "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = chatml_gpt2_tokenizer()
    rows = []
    for name in ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        rows += json.loads((SHARED / "alpaca-real" / name).read_text())
    records = [Record(r, f"{name}[{i}]") for i, r in enumerate(rows)]
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig),
                          {"model": {"name_or_path": "bench"},
                           "data": {"path": "bench", "format": "alpaca", "max_seq_len": args.max_seq_len,
                                    "on_bad_example": "skip"}})

    def pipeline() -> tuple[int, float]:
        stats = Stats()
        enc, _ = _encode(cfg, tok, _format_all(cfg, records, stats), stats)
        bins = pack_examples(enc.lengths(), args.max_seq_len)
        return int(enc.lengths().sum()), float(enc.lengths().sum() / (len(bins) * args.max_seq_len))

    stats = Stats()
    chats = _format_all(cfg, records, stats)
    texts = [tok.apply_chat_template(m, tokenize=False) for m in chats]

    def raw() -> int:
        return sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])

    best = {}
    for label, fn in (("raw", raw), ("pipeline", pipeline)):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        tokens = out if label == "raw" else out[0]
        best[label] = (tokens, min(times), out)
    raw_tps = best["raw"][0] / best["raw"][1]
    pipe_tps = best["pipeline"][0] / best["pipeline"][1]
    print(f"examples: {len(records)} ({stats.skipped_bad} skipped bad), torch threads: {torch.get_num_threads()}")
    print(f"raw batch encode : {best['raw'][0]:>9,} tokens in {best['raw'][1]:.3f}s = {raw_tps:>10,.0f} tokens/s")
    print(f"pipeline         : {best['pipeline'][0]:>9,} tokens in {best['pipeline'][1]:.3f}s = {pipe_tps:>10,.0f} tokens/s")
    print(f"ratio pipeline/raw: {pipe_tps / raw_tps:.2f}x  packing efficiency (max_seq_len "
          f"{args.max_seq_len}): {best['pipeline'][2][1]:.1%}")


if __name__ == "__main__":
    main()
