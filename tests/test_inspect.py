"""stage=inspect: rendering equals the labels, each template check fires on a crafted template
and stays quiet on the built-in one, the CLI writes inspect.html and the length histogram."""

from __future__ import annotations

import re

import pytest
from data_helpers import run_cli
from run_helpers import compose
from test_cli import assert_one_line_error
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from finetune.data.chat_encode import ChatSettings, encode_chats
from finetune.data.records import format_records, read_records
from finetune.data.tokenize import IGNORE, Stats
from finetune.errors import ConfigError
from finetune.inspect import inspect_examples, run_inspect
from finetune.inspect.render import View, html_page, plain_text
from finetune.inspect.template_checks import (conversation_findings, sequence_findings,
                                              template_findings)
from finetune.model.builtin import CHAT_SPECIALS, CHAT_TEMPLATE, _char_tokenizer, tiny_chat_tokenizer
from finetune.model.load import load_tokenizer
from finetune.tasks import get_task

DATE = "2024-07-26"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of hot?"},
        {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "Of up?"},
        {"role": "assistant", "content": "Down."}]


def _setup(recipe: str, examples: int = 3):
    cfg = compose([f"recipe={recipe}", f"inspect.examples={examples}"])
    task = get_task(cfg)
    tok = load_tokenizer(cfg, task)
    items = format_records(cfg, read_records(cfg), Stats())
    return cfg, task, tok, items


def _highlighted_ids(page: str) -> list[list[int]]:
    """Per sequence of an inspect page, the ids of the tokens drawn as supervised."""
    return [[int(i) for i in re.findall(r'class="t s" data-id="(\d+)"', seq)]
            for seq in page.split('<div class="seq">')[1:]]


@pytest.mark.parametrize("recipe,titles", [("lora-llm", ["example"]), ("dpo-llm", ["chosen", "rejected"])])
def test_highlighted_tokens_are_exactly_the_labelled_ones(recipe, titles):
    cfg, task, tok, items = _setup(recipe)
    examples, _ = inspect_examples(cfg, task, tok, items, None)
    whole, _ = task.encode(tok, items, Stats(), None)  # the records encoded together, as training does
    assert len(examples) == 3
    views = [v for _, vs in examples for v in vs]
    assert [v.title for v in views] == titles * 3
    for i, (_, vs) in enumerate(examples):
        assert vs == task.inspect_views(whole, i, None)  # shown = trained
    page = html_page("t", examples, tok, {}, [], None)
    expected = [[t for t, lab in zip(v.ids, v.labels) if lab != IGNORE] for v in views]
    assert _highlighted_ids(page) == expected
    assert all(expected)
    if recipe == "dpo-llm":  # the completions, and only them, are supervised
        record = items[0]
        chosen, rejected = record[0][-1]["content"], record[1][-1]["content"]
        assert tok.decode(expected[0]) == chosen + "<|end|>"
        assert tok.decode(expected[1]) == rejected + "<|end|>"
    marked = re.findall(r"⟦(.*?)⟧", plain_text(views[0], tok), re.S)
    assert "".join(marked) == tok.decode(expected[0])


def test_classification_views_are_titled_with_the_label_name():
    cfg, task, tok, items = _setup("lora-classifier", 2)
    names = sorted({label for _, label in items})
    examples, findings = inspect_examples(cfg, task, tok, items, names)
    assert [v.title for _, vs in examples for v in vs] == [f"label: {items[i][1]}" for i in range(2)]
    assert findings == []  # no chat template is rendered


def _tok(template: str, bos: str | None = None, bos_on_encode: bool = False) -> PreTrainedTokenizerFast:
    raw = _char_tokenizer(CHAT_SPECIALS + ["<s>"])
    if bos_on_encode:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", raw.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", unk_token="<|unk|>",
                                  eos_token="<|end|>", bos_token=bos,
                                  additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tok.chat_template = template
    return tok


def _checks(tok, chat=CHAT, **settings) -> set[str]:
    """Every check that fires for ``chat`` under the tokenizer's template (as stage=inspect runs them)."""
    found = template_findings(tok, DATE) + conversation_findings(tok, DATE, "example 0", chat)
    ids, labels = encode_chats(tok, [chat], ChatSettings(**settings), Stats())
    found += sequence_findings(tok, "example 0", ids[0], labels[0])
    return {f.check for f in found if f.warning}


LOOP = ("{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}"
        "{{ '<|assistant|>' + message['content'] + END }}{%- else -%}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")


def test_the_builtin_template_passes_every_check():
    tok = tiny_chat_tokenizer()
    assert _checks(tok) == set()
    infos = [f for f in template_findings(tok, DATE) if f.check == "generation_markers"]
    assert len(infos) == 1 and not infos[0].warning and "marks assistant text" in infos[0].message


def test_no_end_of_turn_names_the_supervised_turn():
    tok = _tok(LOOP.replace("END", "''"))
    assert _checks(tok, append_eos="never") == {"no_end_of_turn"}
    ids, labels = encode_chats(tok, [CHAT], ChatSettings(append_eos="never"), Stats())
    lines = [f.message for f in sequence_findings(tok, "example 0", ids[0], labels[0])]
    assert [line.split(":")[0] for line in lines] == ["example 0 supervised turn 0", "example 0 supervised turn 1"]
    assert "data.append_eos=always" in lines[0]
    assert "generation_markers" in {f.check for f in template_findings(tok, DATE)}  # info: none


def test_doubled_bos_in_the_render_and_bos_added_on_encode():
    tok = _tok("{{ bos_token }}{{ bos_token }}" + CHAT_TEMPLATE, bos="<s>")
    assert _checks(tok) == {"double_bos"}
    once = _tok("{{ bos_token }}" + CHAT_TEMPLATE, bos="<s>")
    assert _checks(once) == set()
    added = _tok("{{ bos_token }}" + CHAT_TEMPLATE, bos="<s>", bos_on_encode=True)
    assert _checks(added) == {"bos_added_twice"}


def test_text_missing_from_the_render_names_the_turn():
    tok = _tok("{%- for message in messages if message['role'] != 'system' -%}"
               + LOOP.split("{%- for message in messages -%}")[1].replace("END", "'<|end|>'"))
    assert _checks(tok) == {"missing_text"}
    lines = [f.message for f in conversation_findings(tok, DATE, "example 0", CHAT)]
    assert len(lines) == 1 and lines[0].startswith("example 0 turn 0 (system)") and "Be brief." in lines[0]


def test_unstable_prefix_names_the_turn_and_shows_the_difference():
    # A user or system turn ends with a newline only while it is the last message: adding the next
    # turn changes the render before it (turns 1, 2 and 4 are added after such a turn).
    tok = _tok(LOOP.replace("END", "'<|end|>'").replace("'<|end|>' }}{%- endif -%}",
                                                         "'<|end|>' + ('\\n' if loop.last else '') }}{%- endif -%}"))
    assert _checks(tok) == {"unstable_prefix"}
    lines = [f.message for f in conversation_findings(tok, DATE, "example 0", CHAT)]
    assert [line.split(":")[0] for line in lines] == ["example 0 turn 1 (user)", "example 0 turn 2 (assistant)",
                                                       "example 0 turn 4 (assistant)"]
    assert lines[0].startswith("example 0 turn 1 (user): rendering messages[:1] is not a prefix of "
                               "rendering messages[:2]; from character 26 the shorter render has '\\n', "
                               "the longer '<|user|>Opposite of hot?")


def test_template_without_an_assistant_marker():
    tok = _tok("{%- for message in messages -%}{{ message['content'] + '<|end|>' }}{%- endfor -%}")
    assert "no_assistant_marker" in _checks(tok)


@pytest.mark.parametrize("recipe", ["lora-llm", "dpo-llm"])
def test_stage_inspect_writes_the_page_and_the_histogram(recipe, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(f"recipe={recipe}", "stage=inspect", "inspect.examples=2", f"output_dir={out}",
                   cache_dir=tmp_path / "cache", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (out / "inspect.html").read_text()
    assert page.count('<div class="seq">') == (2 if recipe == "lora-llm" else 4)
    assert 'class="t s"' in page and "data:image/png;base64," in page
    assert (out / "inspect_lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "tokens, " in proc.stdout and "truncated: 0" in proc.stdout
    assert not (out / "final").exists()  # nothing trained


def test_streaming_data_is_refused_with_one_line():
    cfg = compose(["recipe=lora-llm", "stage=inspect", "data.streaming=true", "trainer.max_steps=5"])
    with pytest.raises(ConfigError, match="stage=inspect reads the data whole.*data.streaming=false"):
        run_inspect(cfg)


@pytest.mark.parametrize("arg,needles", [
    ("inspect.exampels=2", ["inspect.exampels", "did you mean inspect.examples"]),
    ("inspect.examples=0", ["inspect.examples=0", ">= 1"]),
])
def test_bad_inspect_key_is_one_line(arg, needles, tmp_path):
    proc = run_cli("recipe=lora-llm", "stage=inspect", arg, cache_dir=tmp_path / "cache", timeout=120)
    assert_one_line_error(proc, *needles)
