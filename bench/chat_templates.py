"""The chat-template mask on 13 real model families: supervised text and token-exactness per case.

    python bench/chat_templates.py [--markdown] [--train-on all|last|each]

Data: /work/shared/data/chat-templates-real/<family>.json (the published template + special tokens,
see its PROVENANCE.md), each on a real vocabulary: GPT-2's BPE (tokenizer-gpt2/tokenizer.json) or,
for the Llama-2-vocabulary families (Mistral v0.3, Phi-3/3.5), Llama 2's SentencePiece model
(tokenizer-llama2/tokenizer.model, read with protobuf, no sentencepiece package needed).

For each family and conversation (single-turn, multi-turn, system prompt, reasoning in one turn,
reasoning in two turns, unicode) it prints the path the mask took, the supervised text (the
decoded tokens that carry loss) and how the example's ids compare with ONE encode of the
template's own render of the whole conversation (``apply_chat_template(tokenize=False)``, date
pinned like ``data.chat_date``):
  ``= render``      identical;
  ``= render[:n]``  identical up to the last trained token (the untrained tail, e.g. Qwen's
                    newline after <|im_end|>, is not kept);
  ``folded``        the template refuses/drops the system message: it was folded into the first
                    user turn, and the ids equal one encode of the render of that conversation;
  ``reasoning kept``the template cuts the final turn's reasoning; it is put back (by design).
The "before" column is what the previous pipeline (prefix renders, segments encoded apart) did:
``same`` (text and ids), ``same text, other ids``, ``other text``, or the error it raised.
A second table gives each template's probed layout (finetune/data/chat_template.py ``Layout``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.chat_template import BadChat, chat_template_for
from finetune.data.tokenize import IGNORE, Stats

SHARED = Path("/work/shared/data")
FAMILIES = SHARED / "chat-templates-real"
DATE = "2024-07-26"

CASES = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}],
    "multi": [{"role": "user", "content": "Name a primary colour."},
              {"role": "assistant", "content": "Red."},
              {"role": "user", "content": "Another one?"},
              {"role": "assistant", "content": "Blue."}],
    "system": [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Opposite of hot?"},
               {"role": "assistant", "content": "Cold."}],
    "system-2": [{"role": "system", "content": "You answer in one word."},
                 {"role": "user", "content": "Opposite of hot?"},
                 {"role": "assistant", "content": "Cold."},
                 {"role": "user", "content": "Of up?"},
                 {"role": "assistant", "content": "Down."}],
    "reasoning": [{"role": "user", "content": "What is 17 * 3?"},
                  {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n51."}],
    "reasoning-2": [{"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4.", "reasoning_content": "2 + 2 = 4."},
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": "8.", "reasoning_content": "4 * 2 = 8."}],
    "unicode": [{"role": "user", "content": "Übersetze »猫«, bitte."},
                {"role": "assistant", "content": "猫 = “Katze” 🐈 — ünïcödé."}],
}


def llama2_tokenizer() -> Tokenizer:
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((SHARED / "tokenizer-llama2" / "tokenizer.model").read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    return LlamaTokenizer(vocab=vocab, merges=merges).backend_tokenizer


def family_tokenizer(spec: dict) -> PreTrainedTokenizerFast:
    raw = (llama2_tokenizer() if spec["stand_in_base"] == "llama2"
           else Tokenizer.from_file(str(SHARED / "tokenizer-gpt2" / "tokenizer.json")))
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added_tokens"]])
    kwargs = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if spec[k]}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)
    tok.chat_template = spec["chat_template"]
    return tok


def reference_ids(tok, chat) -> list[int]:
    day = datetime.date.fromisoformat(DATE).strftime("%d %b %Y")  # what data.chat_date pins
    text = tok.apply_chat_template(chat, tokenize=False, date_string=day)
    return tok(text, add_special_tokens=False)["input_ids"]


def before(tok, chat, new_text: str) -> str:
    """What the previous pipeline (prefix renders, segments encoded apart) made of the same case."""
    from finetune.data.tokenize import ChatRenderer, chat_segments, encode_segmented

    try:
        segments = chat_segments(ChatRenderer(tok), chat, train_on_prompt=False)
        ids, labels = encode_segmented(tok, [segments], 1 << 30, "truncate", Stats())
    except Exception as exc:  # noqa: BLE001 - report what it did
        return f"{type(exc).__name__}"
    old = tok.decode([t for t, lab in zip(ids[0], labels[0]) if lab != IGNORE])
    if old != new_text:
        return "other text"
    return "same" if ids[0] == reference_ids(tok, chat)[:len(ids[0])] else "same text, other ids"


def run_case(tok, chat, train_on: str) -> dict:
    stats = Stats()
    settings = ChatSettings(train_on=train_on, date=DATE, name="bench")
    try:
        ids, labels = encode_chats(tok, [chat], settings, stats)
    except BadChat as exc:
        return {"path": "error", "text": str(exc), "exact": "-", "notes": "", "before": "-"}
    notes = {k: v for k, v in stats.template_notes.items() if not k.startswith("path_")}
    path = "/".join(sorted({k[5:] for k in stats.template_notes if k.startswith("path_")}))
    pieces = []
    for example_ids, example_labels in zip(ids, labels):
        pieces.append(tok.decode([t for t, lab in zip(example_ids, example_labels) if lab != IGNORE]))
    text = " | ".join(pieces)
    if train_on == "each":
        exact = "per turn"
    elif "system_folded" in notes:
        users = [i for i, m in enumerate(chat) if m["role"] == "user"]
        into = users[-1] if chat_template_for(tok, DATE).system_in_last_user else users[0]
        folded = [{**m, "content": chat[0]["content"] + "\n\n" + m["content"]} if i == into else m
                  for i, m in enumerate(chat) if i]
        ref = reference_ids(tok, folded)
        exact = "folded, = render" + ("" if ids[0] == ref else "[:n]" if ref[:len(ids[0])] == ids[0]
                                      else " NO")
    else:
        try:
            ref = reference_ids(tok, chat)
        except Exception as exc:  # noqa: BLE001 - report what the template does
            ref = f"raises {exc}"
        got = ids[0]
        if isinstance(ref, str):
            exact = ref
        elif got == ref:
            exact = "= render"
        elif ref[:len(got)] == got:
            exact = "= render[:n]"
        elif got[-1] == tok.eos_token_id and ref[:len(got) - 1] == got[:-1]:
            exact = "= render[:n] + eos"
        elif "reasoning_restored" in notes:
            exact = "reasoning kept"
        else:
            exact = "DIFFERS"
    return {"path": path, "text": text, "exact": exact, "notes": ", ".join(sorted(notes)),
            "before": before(tok, chat, text) if train_on == "all" else "-"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true", help="a markdown table (docs/data.md)")
    ap.add_argument("--train-on", default="all", choices=("all", "last", "each"))
    ap.add_argument("--width", type=int, default=70, help="supervised text shown, in characters")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows, layouts = [], []
    for path in sorted(FAMILIES.glob("*.json")):
        spec = json.loads(path.read_text())
        tok = family_tokenizer(spec)
        template = chat_template_for(tok, DATE)
        layouts.append((path.stem, template.layout, template.system_in_last_user))
        for case, chat in CASES.items():
            rows.append({"family": path.stem, "case": case, **run_case(tok, chat, args.train_on)})
    if args.markdown:
        print("| family | conversation | path | supervised text | ids vs one encode of the render "
              "| before (prefix renders) | notes |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        text = repr(r["text"])
        text = text if len(text) <= args.width else text[:args.width - 3] + "..."
        if args.markdown:
            cells = [r["family"], r["case"], r["path"], "`" + text.replace("|", "\\|") + "`",
                     r["exact"], r["before"], r["notes"]]
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"{r['family']:<27} {r['case']:<12} {r['path']:<9} {r['exact']:<22} "
                  f"{r['before']:<14} {text}" + (f"  [{r['notes']}]" if r["notes"] else ""))
    print()
    if args.markdown:
        print("| family | generation prompt | then, before the final content | after the content, "
              "through the marker | sequence end (trained) | a refused system text goes to |")
        print("|---|---|---|---|---|---|")
    for family, layout, last in layouts:
        cells = [family] + ([repr(layout.gen_prompt), repr(layout.head[1]), repr(layout.tail[1]),
                             repr(layout.seq_end)] if layout else ["(no probe)"] * 4)
        cells.append("last user turn" if last else "first user turn")
        print(("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |") if args.markdown
              else "  ".join(cells))


if __name__ == "__main__":
    main()
