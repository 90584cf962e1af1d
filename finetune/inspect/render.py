"""Examples token by token, supervised tokens highlighted: rich text for the console, HTML for
``inspect.html``. A view is one sequence the task trains on (a causal-LM example; a DPO pair's
chosen and rejected sequences; a KTO example; a classifier's input with its label name)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from finetune.data.tokenize import IGNORE


@dataclass(frozen=True)
class View:
    title: str  # "chosen", "rejected", "label: positive", ...
    ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> list[bool]:
        return [lab != IGNORE for lab in self.labels]

    def counts(self) -> str:
        return f"{len(self.ids)} tokens, {sum(self.supervised)} supervised"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as text (a byte-level token cut inside a character decodes to U+FFFD)."""
    return [tokenizer.decode([i]) for i in ids]


def supervised_runs(view: View) -> list[tuple[int, int]]:
    """[start, end) token ranges of consecutive supervised tokens (one per trained turn)."""
    runs, start = [], None
    for k, sup in enumerate(view.supervised + [False]):
        if sup and start is None:
            start = k
        elif not sup and start is not None:
            runs.append((start, k))
            start = None
    return runs


def rich_text(view: View, tokenizer):
    """The view as a :class:`rich.text.Text`: supervised tokens on green, token boundaries shown by
    alternating shades (:func:`plain_text` is the colourless form)."""
    from rich.text import Text

    text = Text()
    shades = {True: ("black on green3", "black on green"), False: ("", "on grey23")}
    for k, (piece, sup) in enumerate(zip(token_texts(tokenizer, view.ids), view.supervised)):
        text.append(piece, style=shades[sup][k % 2])
    return text


def plain_text(view: View, tokenizer) -> str:
    """The view as plain text, each run of supervised tokens wrapped in ⟦ ⟧ (not a terminal)."""
    pieces = token_texts(tokenizer, view.ids)
    for start, end in reversed(supervised_runs(view)):
        pieces[start:end] = ["⟦", *pieces[start:end], "⟧"]
    return "".join(pieces)


def print_examples(examples: list[tuple[str, list[View]]], tokenizer) -> None:
    """The examples on stdout: coloured on a terminal, ⟦supervised⟧ marks otherwise."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for name, views in examples:
        for view in views:
            console.print(f"── {name} — {view.title}: {view.counts()}", style="bold cyan", markup=False)
            if console.is_terminal:
                console.print(rich_text(view, tokenizer))
            else:
                console.print(plain_text(view, tokenizer), markup=False)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
.seq{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;padding:.6em}
.t{border-right:1px solid #bbb}.s{background:#b7f0b1}.p{color:#555}
.warn{color:#a40}.info{color:#555}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"""


def _sequence_html(view: View, tokenizer) -> str:
    spans = []
    for token_id, piece, sup in zip(view.ids, token_texts(tokenizer, view.ids), view.supervised):
        shown = html.escape(piece.replace("\n", "↵\n"))
        spans.append(f'<span class="t {"s" if sup else "p"}" data-id="{token_id}" '
                     f'title="{token_id}">{shown}</span>')
    return f'<div class="seq">{"".join(spans)}</div>'


def html_page(title: str, examples: list[tuple[str, list[View]]], tokenizer, figures: dict,
              findings: list, image: bytes | None) -> str:
    """A self-contained page (the histogram PNG inlined): figures, template findings, examples."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
             "<p>Supervised tokens (the loss is computed on them) are <span class='s'>highlighted</span>; "
             "hover a token for its id.</p><h2>Data</h2><table>"]
    parts += [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in figures.items()]
    parts.append("</table><h2>Template checks</h2><ul>")
    parts += [f"<li class='{'warn' if f.warning else 'info'}'>{esc(f.message)}</li>" for f in findings]
    parts.append("</ul>")
    if image:
        data = base64.b64encode(image).decode()
        parts.append(f"<h2>Lengths</h2><img src='data:image/png;base64,{data}' alt='length histogram'>")
    parts.append("<h2>Examples</h2>")
    for name, views in examples:
        for view in views:
            parts.append(f"<h3>{esc(name)} — {esc(view.title)}: {esc(view.counts())}</h3>")
            parts.append(_sequence_html(view, tokenizer))
    parts.append("</body></html>")
    return "\n".join(parts)
