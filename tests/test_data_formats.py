"""Formats, loss masks and EOS, with the built-in char tokenizer and a Qwen-like BPE built in code."""

from __future__ import annotations

import pytest
from data_helpers import make_cfg, qwen_like_tokenizer, write_jsonl

from finetune.model.builtin import tiny_chat_tokenizer
from finetune.data import prepare_data
from finetune.data.tokenize import IGNORE, ChatRenderer, chat_segments

TOKENIZERS = {"builtin": tiny_chat_tokenizer, "qwen-like-bpe": qwen_like_tokenizer}


def _examples(tmp_path, tok, rows, *overrides):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(f"data.path={path}", "data.eval_size=0", "data.eval_split=null", *overrides,
                   cache_dir=tmp_path / "cache")
    data = prepare_data(cfg, tok)
    enc = data.train.encoded
    return [tuple(x.tolist() for x in enc.example(i)) for i in range(len(enc))], data


def _targets(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_alpaca_loss_only_on_the_response_and_ends_with_eos(tmp_path, name):
    tok = TOKENIZERS[name]()
    rows = [{"instruction": "Sort the numbers", "input": "3, 1, 2", "output": "1, 2, 3"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, rows)
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert _targets(tok, ids, labels) == "1, 2, 3" + tok.eos_token
    assert labels[0] == IGNORE
    full = tok.apply_chat_template([{"role": "user", "content": "Sort the numbers\n\n3, 1, 2"},
                                    {"role": "assistant", "content": "1, 2, 3"}], tokenize=False)
    # The example is the rendered chat, cut after the final EOS (Qwen's trailing "\n" goes).
    assert tok.decode(ids) == full[: full.rindex(tok.eos_token) + len(tok.eos_token)]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_train_on_prompt_includes_the_prompt(tmp_path, name):
    tok = TOKENIZERS[name]()
    rows = [{"instruction": "Say hi", "output": "hi"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, rows, "data.train_on_prompt=true")
    assert labels[1:] == ids[1:] and labels[0] == IGNORE


@pytest.mark.parametrize("name", TOKENIZERS)
def test_messages_with_system_and_two_turns(tmp_path, name):
    tok = TOKENIZERS[name]()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say a"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "Say b"},
            {"role": "assistant", "content": "b"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, [{"messages": chat}], "data.format=messages")
    text = _targets(tok, ids, labels)
    assert "Be brief" not in text and "Say" not in text
    assert text.startswith("a") and text.endswith("b" + tok.eos_token)
    assert ids[-1] == tok.eos_token_id
    assert "Be brief." in tok.decode(ids)  # the system turn is in the input, not trained on


def test_system_prompt_is_added_when_the_row_has_none(tmp_path):
    tok = tiny_chat_tokenizer()
    [(ids, _)], _ = _examples(tmp_path, tok, [{"instruction": "x", "output": "y"}],
                              "data.system_prompt=Answer tersely.")
    assert tok.decode(ids).startswith("<|system|>Answer tersely.<|end|>")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_sharegpt(tmp_path, name):
    tok = TOKENIZERS[name]()
    conv = [{"from": "human", "value": "ping"}, {"from": "gpt", "value": "pong"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, [{"conversations": conv}], "data.format=sharegpt")
    assert _targets(tok, ids, labels) == "pong" + tok.eos_token


@pytest.mark.parametrize("name", TOKENIZERS)
def test_prompt_completion_with_renamed_columns(tmp_path, name):
    tok = TOKENIZERS[name]()
    rows = [{"question": "2+2=", "answer": "4"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, rows, "data.format=prompt_completion",
                                   "data.columns.prompt=question", "data.columns.completion=answer")
    assert tok.decode(ids) == "2+2=4" + tok.eos_token
    assert _targets(tok, ids, labels) == "4" + tok.eos_token


def test_alpaca_with_renamed_columns(tmp_path):
    tok = tiny_chat_tokenizer()
    rows = [{"q": "Say x", "a": "x"}]
    [(ids, labels)], _ = _examples(tmp_path, tok, rows, "data.columns.instruction=q", "data.columns.output=a")
    assert _targets(tok, ids, labels) == "x<|end|>"


def test_text_documents_are_chunked_to_max_seq_len_with_eos(tmp_path):
    tok = tiny_chat_tokenizer()
    rows = [{"text": "a" * 50}, {"text": "b" * 30}]
    examples, data = _examples(tmp_path, tok, rows, "data.format=text", "data.max_seq_len=32")
    stream = [t for ids, _ in examples for t in ids]
    assert [len(ids) for ids, _ in examples] == [32, 32, 18]
    assert tok.decode(stream) == "a" * 50 + "<|end|>" + "b" * 30 + "<|end|>"
    assert all(labels[0] == IGNORE and labels[1:] == ids[1:] for ids, labels in examples)


def test_classification_labels(tmp_path):
    from finetune.model.builtin import tiny_bert_tokenizer

    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = make_cfg("model=tiny-bert", "recipe=lora-classifier", f"data.path={path}",
                   "data.format=classification", "data.eval_size=0", "data.eval_split=null",
                   cache_dir=tmp_path / "cache")
    data = prepare_data(cfg, tiny_bert_tokenizer())
    assert data.label_names == ["neg", "pos"]
    assert data.train[0]["class_label"] == 1 and data.train[1]["class_label"] == 0


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chat_renderer_matches_apply_chat_template(name):
    tok = TOKENIZERS[name]()
    render = ChatRenderer(tok)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for gen in (True, False):
        assert render(chat[:1], gen) == tok.apply_chat_template(chat[:1], tokenize=False,
                                                                add_generation_prompt=gen)
    segments = chat_segments(render, chat, train_on_prompt=False)
    assert "".join(t for t, _ in segments) == tok.apply_chat_template(chat, tokenize=False)
    assert [t for t, trained in segments if trained] == [segments[-1][0]]
