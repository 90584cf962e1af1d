"""Chat templates that break prefix-render masks, reproduced with crafted templates and small
vocabularies built here: the ids of an example are ONE encode of the template's render, and the
supervised text is asserted exactly (finetune/data/chat_template.py)."""

from __future__ import annotations

import functools
import logging

import pytest
from data_helpers import CORPUS, make_cfg, run_cli, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from finetune.data import cache_key, prepare_data
from finetune.data.chat_encode import ChatSettings, encode_chats, render_prompts
from finetune.data.chat_presets import presets, resolve_chat_template
from finetune.data.chat_template import BadChat, chat_template_for
from finetune.data.sources import Record
from finetune.data.streaming import encode_chunk
from finetune.data.tokenize import IGNORE, Stats
from finetune.errors import ConfigError, DataError
from finetune.tasks import get_task

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|user|>",
            "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]", "<start_of_turn>",
            "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<｜User｜>",
            "<｜Assistant｜>"]
TEXT = CORPUS + ["What is 2 + 2? Four. 2 + 2 = 4. And doubled? Eight. 4 * 2 = 8.",
                 "Be brief. Say a. Say b. Opposite of hot? Cold. Name a colour. Red. Blue.",
                 "The answer is four.\nThe answer is eight.\n"] * 20

# Qwen3's history rewrite, shortened: reasoning is rendered only on turns after the last user turn.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last -%}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content"
    " + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
# Phi-3: the render of a whole conversation ends with eos_token, a prompt does not.
PHI3_LIKE = ("{% for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Mistral Nemo: the system text goes into the user turn only when that turn is the last message.
NEMO_LIKE = (
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ bos_token }}{%- for m in loop_messages -%}{%- if m.role == 'user' -%}"
    "{%- if loop.last and system is defined -%}{{ '[INST]' + system + '\n\n' + m.content + '[/INST]' }}"
    "{%- else -%}{{ '[INST]' + m.content + '[/INST]' }}{%- endif -%}"
    "{%- else -%}{{ m.content + eos_token }}{%- endif -%}{%- endfor -%}")
# Gemma-2: raises on a system message; turns end with <end_of_turn>, which is not eos_token.
GEMMA2_LIKE = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n'"
    " + m.content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Mistral v0.3: no system branch at all (system messages vanish), no generation prompt.
MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}"
                "{% if m.role == 'user' %}{{ ' [INST] ' + m.content + ' [/INST]' }}"
                "{% elif m.role == 'assistant' %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}"
                "{% endfor %}")
# DeepSeek-R1: every assistant turn is cut to what follows </think>.
DEEPSEEK_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '<｜User｜>' + m.content }}"
    "{% elif m.role == 'assistant' %}{% set content = m.content %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
# Llama-3.2: a date header from strftime_now().
DATED = ("Today {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}"
         "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# No end-of-turn marker at all.
PLAIN = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\n\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

TWO_TURNS = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "<think>\n2 + 2 = 4.\n</think>\n\nFour."},
             {"role": "user", "content": "And doubled?"},
             {"role": "assistant", "content": "<think>\n4 * 2 = 8.\n</think>\n\nEight."}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of hot?"},
          {"role": "assistant", "content": "Cold."}]


@functools.lru_cache(maxsize=None)
def _trained(kind: str) -> str:
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "sentencepiece":  # Llama-2 / Mistral v0.3 / Phi-3 style: "▁" word prefix, first word
        # too; a newline stays its own piece (Llama-2's byte token <0x0A>)
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(TEXT)) | {"▁", "\n"})
    else:  # GPT-2 / Qwen / Llama-3 style byte-level BPE
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                                      initial_alphabet=alphabet))
    raw.add_tokens(["<think>", "</think>"])  # added, not special (as in Qwen3)
    return raw.to_str()


def tokenizer(template: str, kind: str = "bpe", eos: str = "</s>", bos: str | None = "<s>"):
    extra = {"bos_token": bos} if bos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(kind)), eos_token=eos,
                                  unk_token="<unk>", pad_token="<unk>", **extra)
    tok.chat_template = template
    return tok


def encode(tok, chat, **settings):
    stats = Stats()
    ids, labels = encode_chats(tok, [chat], ChatSettings(**settings), stats)
    return ids, labels, stats


def supervised(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def one_encode(tok, chat, **kwargs) -> list[int]:
    text = tok.apply_chat_template(chat, tokenize=False, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------- history rewrite
def test_history_rewrite_trains_each_turn_as_the_final_render_has_it(caplog):
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>", bos=None)
    with caplog.at_level(logging.WARNING):
        [ids], [labels], stats = encode(tok, TWO_TURNS)
    # The first turn lost its reasoning in the final render (history), the last keeps it.
    assert supervised(tok, ids, labels) == \
        "Four.<|im_end|><think>\n4 * 2 = 8.\n</think>\n\nEight.<|im_end|>"
    assert one_encode(tok, TWO_TURNS)[:len(ids)] == ids  # the render, without its trailing "\n"
    assert stats.template_notes["history_reasoning_dropped"] == 1
    assert "data.train_on=each" in caplog.text


def test_train_on_each_keeps_every_turns_reasoning_and_last_only_the_final():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>", bos=None)
    ids, labels, _ = encode(tok, TWO_TURNS, train_on="each")
    assert [supervised(tok, i, lab) for i, lab in zip(ids, labels)] == [
        "<think>\n2 + 2 = 4.\n</think>\n\nFour.<|im_end|>",
        "<think>\n4 * 2 = 8.\n</think>\n\nEight.<|im_end|>"]
    assert ids[0] == one_encode(tok, TWO_TURNS[:2])[:len(ids[0])]
    [ids], [labels], _ = encode(tok, TWO_TURNS, train_on="last")
    assert supervised(tok, ids, labels) == "<think>\n4 * 2 = 8.\n</think>\n\nEight.<|im_end|>"


def test_reasoning_field_renders_like_think_tags():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>", bos=None)
    chat = [TWO_TURNS[0], {"role": "assistant", "content": "Four.", "reasoning_content": "2 + 2 = 4."}]
    [ids], [labels], _ = encode(tok, chat)
    assert supervised(tok, ids, labels) == "<think>\n2 + 2 = 4.\n</think>\n\nFour.<|im_end|>"


def test_phi3_trailing_eos_is_the_templates_own_sequence_end():
    tok = tokenizer(PHI3_LIKE, kind="sentencepiece", eos="<|endoftext|>")
    chat = TWO_TURNS[:1] + [{"role": "assistant", "content": "Four."}, TWO_TURNS[2],
                            {"role": "assistant", "content": "Eight."}]
    [ids], [labels], stats = encode(tok, chat)
    assert ids == one_encode(tok, chat)  # the whole render, encoded once
    assert supervised(tok, ids, labels) == "Four.<|end|>Eight.<|end|>\n<|endoftext|>"
    assert stats.template_notes == {"path_verbatim": 1}
    layout = chat_template_for(tok, "2024-07-26").layout
    assert (layout.gen_prompt, layout.tail[1], layout.seq_end) == ("<|assistant|>\n", "<|end|>",
                                                                   "\n<|endoftext|>")
    [ids], [labels], _ = encode(tok, chat, append_eos="never")
    assert supervised(tok, ids, labels).endswith("Eight.<|end|>")


# --------------------------------------------------------------------- system messages
def test_system_text_the_template_puts_in_the_last_user_turn():
    tok = tokenizer(NEMO_LIKE)
    chat = SYSTEM[:1] + TWO_TURNS[:1] + [{"role": "assistant", "content": "Four."}, TWO_TURNS[2],
                                         {"role": "assistant", "content": "Eight."}]
    [ids], [labels], stats = encode(tok, chat)
    # As the model is prompted for its final turn: the template's own prompt, then the turn.
    prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("[INST]Be brief.\n\nAnd doubled?[/INST]")
    assert ids == tok(prompt + "Eight.</s>", add_special_tokens=False)["input_ids"]
    assert supervised(tok, ids, labels) == "Four.</s>Eight.</s>"
    assert stats.template_notes["system_folded"] == 1


def test_system_refused_by_the_template_is_folded_into_the_first_user_turn(caplog):
    tok = tokenizer(GEMMA2_LIKE, eos="</s>")
    with caplog.at_level(logging.WARNING):
        [ids], [labels], stats = encode(tok, SYSTEM, name="gemma-2")
        encode(tok, SYSTEM, name="gemma-2")
    folded = [{"role": "user", "content": "Be brief.\n\nOpposite of hot?"}, SYSTEM[2]]
    assert one_encode(tok, folded)[:len(ids)] == ids
    assert supervised(tok, ids, labels) == "Cold.<end_of_turn>"
    assert caplog.text.count("System role not supported") == 1  # warned once per run
    assert "gemma-2" in caplog.text and stats.template_notes["system_folded"] == 1


def test_system_without_a_system_branch_is_folded_not_lost():
    tok = tokenizer(MISTRAL_LIKE, kind="sentencepiece")
    [ids], [labels], stats = encode(tok, SYSTEM)
    assert "Be brief." in tok.decode(ids)
    assert supervised(tok, ids, labels) == "Cold. </s>"
    assert stats.template_notes["system_folded"] == 1
    with pytest.raises(BadChat, match="drops the system message"):
        encode(tok, SYSTEM, strict=True)


def test_strict_template_refusal_is_one_line_naming_the_row(tmp_path):
    tok = tokenizer(GEMMA2_LIKE)
    rows = [{"messages": SYSTEM[1:]}, {"messages": SYSTEM}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(f"data.path={path}", "data.format=messages", "data.eval_size=0",
                   "data.strict_template=true", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tok)
    message = str(err.value)
    assert message.startswith(
        f"{path}:2: the chat template raised (template line 1): System role not supported")
    assert "\n" not in message and "data.on_bad_example=skip" in message
    skip = make_cfg(f"data.path={path}", "data.format=messages", "data.eval_size=0",
                    "data.strict_template=true", "data.on_bad_example=skip",
                    cache_dir=tmp_path / "cache")
    stats = prepare_data(skip, tok).stats["train"]
    assert stats["skipped_bad"] == 1 and stats["kept"] == 1
    assert stats["bad_examples"][0].startswith(f"{path}:2:")


def test_a_row_the_template_cannot_render_is_a_bad_row_in_streaming_too():
    tok = tokenizer(GEMMA2_LIKE)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
           {"role": "assistant", "content": "c"}]
    pairs = [(Record({"messages": SYSTEM[1:]}, "s.jsonl:1"), "messages"),
             (Record({"messages": bad}, "s.jsonl:2"), "messages")]
    cfg = make_cfg("data.path=x", "data.format=messages", "data.on_bad_example=skip")
    stats = Stats()
    examples = encode_chunk(cfg, tok, get_task(cfg), pairs, stats, None)
    assert len(examples) == 1 and stats.skipped_bad == 1
    assert stats.bad_examples == ["s.jsonl:2: the chat template raised (template line 1): Conversation "
                                  "roles must alternate user/assistant/user/assistant/..."]


# --------------------------------------------------------------------- reasoning split
def test_reasoning_cut_by_the_template_is_kept_in_the_final_trained_turn():
    tok = tokenizer(DEEPSEEK_LIKE)
    [ids], [labels], stats = encode(tok, TWO_TURNS)
    # The first turn as the final render has it (the template keeps the "\n\n" after </think>).
    assert supervised(tok, ids, labels) == "\n\nFour.</s><think>\n4 * 2 = 8.\n</think>\n\nEight.</s>"
    render = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    kept = render.replace("<｜Assistant｜>\n\nEight.", "<｜Assistant｜>" + TWO_TURNS[3]["content"])
    assert ids == tok(kept, add_special_tokens=False)["input_ids"]  # one encode of that text
    assert stats.template_notes["reasoning_restored"] == 1
    field = [TWO_TURNS[0], {"role": "assistant", "content": "Four.", "reasoning_content": "2 + 2 = 4."}]
    [ids], [labels], _ = encode(tok, field)
    assert supervised(tok, ids, labels) == "<think>\n2 + 2 = 4.\n</think>\n\nFour.</s>"


def test_reasoning_a_template_cannot_show_is_reported_as_lost(caplog):
    tok = tokenizer(GEMMA2_LIKE)
    chat = [TWO_TURNS[0], {"role": "assistant", "content": "Four.", "reasoning_content": "2 + 2 = 4."}]
    with caplog.at_level(logging.WARNING):
        [ids], [labels], stats = encode(tok, chat)
    assert supervised(tok, ids, labels) == "Four.<end_of_turn>"
    assert stats.template_notes["dropped reasoning"] == 1 and "'2 + 2 = 4.'" in caplog.text
    with pytest.raises(BadChat, match="drops reasoning"):
        encode(tok, chat, strict=True)


# --------------------------------------------------------------------- SentencePiece prefix space
def test_sentencepiece_reply_is_tokenised_as_in_the_whole_render():
    tok = tokenizer(PHI3_LIKE, kind="sentencepiece", eos="<|endoftext|>")
    chat = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "The answer is four."}]
    [ids], [labels], _ = encode(tok, chat)
    assert ids == one_encode(tok, chat)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    alone = tok("The answer is four.<|end|>", add_special_tokens=False)["input_ids"]
    # Encoded on its own the reply would start with a "▁" piece the render does not contain.
    assert tok.convert_ids_to_tokens(alone[0]).startswith("▁")
    assert not tok.convert_ids_to_tokens(ids[first]).startswith("▁") and ids[first] != alone[0]
    assert supervised(tok, ids, labels) == "The answer is four.<|end|>\n<|endoftext|>"


def test_mistral_reply_after_inst_keeps_its_single_space_token():
    tok = tokenizer(MISTRAL_LIKE, kind="sentencepiece")
    chat = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "The answer is four."}]
    [ids], [labels], _ = encode(tok, chat)
    assert ids == one_encode(tok, chat) and ids.count(tok.bos_token_id) == 1
    assert supervised(tok, ids, labels) == "The answer is four. </s>"
    assert ids.count(tok.eos_token_id) == 1  # the template's own </s>: nothing appended


# --------------------------------------------------------------------- end of turn
def test_end_of_turn_marker_is_not_followed_by_eos():
    tok = tokenizer(GEMMA2_LIKE, eos="</s>")
    [ids], [labels], _ = encode(tok, SYSTEM[1:])
    assert supervised(tok, ids, labels) == "Cold.<end_of_turn>"
    assert tok.eos_token_id not in ids and ids == one_encode(tok, SYSTEM[1:])[:len(ids)]
    [ids], [labels], _ = encode(tok, SYSTEM[1:], append_eos="always")
    assert supervised(tok, ids, labels) == "Cold.<end_of_turn></s>"


def test_a_template_without_markers_gets_eos_once():
    tok = tokenizer(PLAIN)
    [ids], [labels], stats = encode(tok, SYSTEM[1:])
    # " Cold" is one byte-level token that starts in the prompt's "assistant: ": it is trained.
    assert supervised(tok, ids, labels) == " Cold.</s>" and stats.template_notes["eos_appended"] == 1
    assert ids[:-1] == one_encode(tok, SYSTEM[1:])[:len(ids) - 1]
    [ids], [labels], _ = encode(tok, SYSTEM[1:], append_eos="never")
    assert supervised(tok, ids, labels) == " Cold." and tok.eos_token_id not in ids


def test_trimmed_content_takes_the_sentinel_path_with_exact_text():
    tok = tokenizer(GEMMA2_LIKE)
    chat = [{"role": "user", "content": " Opposite of hot? "},
            {"role": "assistant", "content": "  Cold.\n"}]
    [ids], [labels], stats = encode(tok, chat)
    assert supervised(tok, ids, labels) == "Cold.<end_of_turn>"
    assert stats.template_notes == {"path_sentinel": 1} and ids == one_encode(tok, chat)[:len(ids)]


def test_unicode_round_trips_exactly():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>", bos=None)
    chat = [{"role": "user", "content": "Übersetze »猫«"},
            {"role": "assistant", "content": "猫 = “Katze” 🐈 — ü."}]
    [ids], [labels], _ = encode(tok, chat, train_on="last")
    assert supervised(tok, ids, labels) == "<think>\n\n</think>\n\n猫 = “Katze” 🐈 — ü.<|im_end|>"
    assert ids == one_encode(tok, chat)[:len(ids)]


# --------------------------------------------------------------------- dates, presets, cache
def test_strftime_now_is_pinned_and_keyed(tmp_path):
    tok = tokenizer(DATED, eos="<|im_end|>", bos=None)
    [ids], _, _ = encode(tok, SYSTEM[1:])
    assert tok.decode(ids).startswith("Today 26 Jul 2024\n")
    [ids], _, _ = encode(tok, SYSTEM[1:], date="2025-01-02")
    assert tok.decode(ids).startswith("Today 02 Jan 2025\n")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": SYSTEM}])
    assert cache_key(make_cfg(f"data.path={path}"), tok) != \
        cache_key(make_cfg(f"data.path={path}", "data.chat_date=2025-01-02"), tok)


@pytest.mark.parametrize("preset", presets())
def test_presets_mask_their_own_end_of_turn(preset):
    tok = tokenizer(resolve_chat_template(preset, tokenizer("{{ '' }}")))
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    [ids], [labels], stats = encode(tok, chat)
    expected = {"chatml": "Red.<|im_end|>", "llama3": "Red.<|eot_id|>", "gemma": "Red.<end_of_turn>",
                "mistral": " Red.</s>", "phi3": "Red.<|end|>", "deepseek-r1": "Red.</s>",
                "qwen3": "<think>\n\n</think>\n\nRed.<|im_end|>"}[preset]
    assert supervised(tok, ids, labels) == expected and "path_verbatim" in stats.template_notes
    assert ids == one_encode(tok, chat)[:len(ids)]
    prompt = one_encode(tok, chat[:1], add_generation_prompt=True)
    assert render_prompts(tok, [chat[:1]], ChatSettings()) == [prompt]


def test_chat_template_setting_resolves_presets_files_and_strings(tmp_path):
    tok = tokenizer("{{ '' }}")
    assert resolve_chat_template("chatml", tok).startswith("{#- ChatML")
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ 1 }}"}')
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0].content }}"
    assert resolve_chat_template(str(tmp_path / "tokenizer_config.json")) == "{{ 1 }}"
    assert resolve_chat_template("{{ x }}") == "{{ x }}"
    with pytest.raises(ConfigError, match="not a preset"):
        resolve_chat_template("chatmll")
    from finetune.model.builtin import tiny_chat_tokenizer
    with pytest.raises(ConfigError, match="no token for <|im_start|>"):
        resolve_chat_template("chatml", tiny_chat_tokenizer())


def test_builtin_template_takes_the_generation_path():
    from finetune.model.builtin import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    [ids], [labels], stats = encode(tok, SYSTEM)
    assert supervised(tok, ids, labels) == "Cold.<|end|>"
    assert stats.template_notes == {"path_generation": 1}
    assert chat_template_for(tok, "2024-07-26").layout.tail == ("<|end|>", "<|end|>")


def test_cli_refusal_with_strict_template_is_one_line(tmp_path):
    """The whole CLI: a template file that raises on a system message, no traceback."""
    template = tmp_path / "refuses.jinja"
    template.write_text("{% if messages[0].role == 'system' %}{{ raise_exception('System role not "
                        "supported') }}{% endif %}{% for m in messages %}{{ '<|' + m.role + '|>' + "
                        "m.content + '<|end|>' }}{% endfor %}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": SYSTEM}])
    out = run_cli("recipe=lora-llm", f"data.path={data}", "data.format=messages", "data.eval_size=0",
                  f"model.chat_template={template}", "data.strict_template=true",
                  "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}", cache_dir=tmp_path / "c")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "System role not supported" in line]
    assert len(lines) == 1 and f"{data}:1:" in lines[0]


def test_reasoning_fields_of_messages_rows_reach_the_template(tmp_path):
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>", bos=None)
    answer = {"role": "assistant", "content": "Four."}
    rows = [{"messages": [TWO_TURNS[0], {**answer, "thinking": "2 + 2 = 4."}]},
            {"messages": [TWO_TURNS[0], {**answer, "reasoning": 4}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(f"data.path={path}", "data.format=messages", "data.eval_size=0",
                   "data.on_bad_example=skip", "data.train_on=last", cache_dir=tmp_path / "cache")
    data = prepare_data(cfg, tok)
    ids, labels = (x.tolist() for x in data.train.encoded.example(0))
    assert supervised(tok, ids, labels) == "<think>\n2 + 2 = 4.\n</think>\n\nFour.<|im_end|>"
    assert data.stats["train"]["bad_examples"] == [
        f"{path}:2: message 1: reasoning must be a string, got int"]
