"""A chat UI over a fine-tuned model: its answers and its base model's, side by side, streamed.

:class:`ChatGenerator` does the work without Gradio (tests drive it directly): it renders the
conversation with the tokenizer's chat template (``add_generation_prompt=True``), generates in a
thread and yields the growing answer through transformers' ``TextIteratorStreamer``. The base
answer of a LoRA adapter comes from the same model with the adapter switched off
(peft's ``disable_adapter``); a merged or fully fine-tuned model is compared with a separately
loaded base model. :func:`build_app` lays the Gradio page over a generator.

This module imports nothing from finetune on purpose: the Hub Space pushed by ``hub.space=true``
runs this very file as its ``app.py`` (:mod:`finetune.chat.space` appends the entry point).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FINETUNED, BASE = "fine-tuned", "base"
DECODE = {"skip_special_tokens": True}  # the same decoding for streamed and whole answers


@dataclass(frozen=True)
class Sampling:
    """The UI's sampling settings; temperature 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": int(self.max_new_tokens)}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "max_new_tokens": int(self.max_new_tokens)}


class ChatGenerator:
    """Answers of the fine-tuned model and of its base, whole or streamed.

    ``model`` is a peft model (the base answer switches its adapter off) or a plain transformers
    model, then compared with ``base_model`` when one is given. One answer is generated at a time:
    switching an adapter off changes the shared model for every thread.
    """

    def __init__(self, model, tokenizer, base_model=None):
        self.model, self.tokenizer, self.base_model = model.eval(), tokenizer, base_model
        self.is_adapter = hasattr(model, "disable_adapter")
        self.has_base = self.is_adapter or base_model is not None
        self._lock = threading.Lock()

    def prompt_inputs(self, messages: list[dict]) -> dict:
        """The conversation rendered by the chat template, ending with the assistant's prompt."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")

    def answer(self, messages: list[dict], side: str = FINETUNED, sampling: Sampling = Sampling()) -> str:
        """The whole answer at once (no streaming)."""
        inputs = self.prompt_inputs(messages)
        with self._lock:
            output = self._generate(side, inputs, sampling)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], **DECODE)

    def stream(self, messages: list[dict], side: str = FINETUNED, sampling: Sampling = Sampling()) -> Iterator[str]:
        """The answer so far, growing as tokens arrive; the last value is the whole answer."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Cancelled(StoppingCriteria):  # a reader that stops early ends the generation too
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        self._check_side(side)
        inputs, stop, failed = self.prompt_inputs(messages), threading.Event(), []
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, **DECODE)
        extra = {"streamer": streamer, "stopping_criteria": StoppingCriteriaList([Cancelled()])}

        def work() -> None:
            try:
                self._generate(side, inputs, sampling, extra)
            except Exception as error:  # noqa: BLE001 - re-raised in the reader's thread below
                failed.append(error)
                streamer.end()  # or the reader would wait for tokens forever

        with self._lock:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            text = ""
            try:
                for piece in streamer:  # "" for tokens that decode to nothing (special tokens)
                    if piece:
                        text += piece
                        yield text
            finally:
                stop.set()
                worker.join()
        if failed:
            raise failed[0]
        if not text:
            yield text  # an empty answer is an answer too

    def _check_side(self, side: str) -> None:
        if side not in (FINETUNED, BASE) or (side == BASE and not self.has_base):
            raise ValueError(f"no {side!r} model to answer with")

    def _generate(self, side: str, inputs: dict, sampling: Sampling, extra: dict | None = None):
        import contextlib

        import torch

        self._check_side(side)
        model = self.base_model if side == BASE and not self.is_adapter else self.model
        adapter_off = self.model.disable_adapter() if side == BASE and self.is_adapter else contextlib.nullcontext()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad(), adapter_off:
            return model.generate(**inputs, **sampling.generate_kwargs(), pad_token_id=pad, **(extra or {}))


def load_generator(model_id: str, base_model: str | None = None, token: str | None = None) -> ChatGenerator:
    """A generator over a model directory or Hub repo: a LoRA adapter (its base named in
    adapter_config.json) or a full model, then compared with ``base_model`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id, token=token)
    config = adapter_config(model_id, token)
    if config is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model or config["base_model_name_or_path"],
                                                    dtype=torch.float32, token=token)
        return ChatGenerator(PeftModel.from_pretrained(base, model_id, token=token), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, token=token)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, token=token) if base_model else None
    return ChatGenerator(model, tokenizer, base.eval() if base is not None else None)


def adapter_config(model_id: str, token: str | None = None) -> dict | None:
    """adapter_config.json of a local dir or Hub repo, or None for a full model."""
    if Path(model_id).is_dir():
        path = Path(model_id) / "adapter_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import file_exists, hf_hub_download

    if not file_exists(model_id, "adapter_config.json", token=token):
        return None
    return json.loads(Path(hf_hub_download(model_id, "adapter_config.json", token=token)).read_text())


def build_app(generator: ChatGenerator, title: str = "finetune chat", max_new_tokens: int = 256):
    """The Gradio page: a prompt box, sampling sliders and one chat column per model."""
    import gradio as gr

    def respond(message, finetuned, base, temperature, top_p, new_tokens):
        sampling = Sampling(temperature, top_p, int(new_tokens))
        columns = [(FINETUNED, finetuned)] + ([(BASE, base)] if generator.has_base else [])
        histories = {side: history + [{"role": "user", "content": message}] for side, history in columns}
        shown = {side: history + [{"role": "assistant", "content": ""}] for side, history in histories.items()}
        for side, _ in columns:  # one answer at a time, each streamed into its own column
            for text in generator.stream(histories[side], side, sampling):
                shown[side][-1] = {"role": "assistant", "content": text}
                yield "", shown[FINETUNED], shown.get(BASE, base), shown[FINETUNED], shown.get(BASE, base)

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}")
        with gr.Row():
            finetuned_chat = gr.Chatbot(label=FINETUNED, elem_id="finetuned")
            base_chat = gr.Chatbot(label=BASE, elem_id="base", visible=generator.has_base)
        prompt = gr.Textbox(label="message", placeholder="Type a message and press Enter", elem_id="prompt")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("sampling", open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p")
            new_tokens = gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="max_new_tokens")
        finetuned_state, base_state = gr.State([]), gr.State([])
        inputs = [prompt, finetuned_state, base_state, temperature, top_p, new_tokens]
        outputs = [prompt, finetuned_chat, base_chat, finetuned_state, base_state]
        prompt.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        clear.click(lambda: ([], [], [], []), None, [finetuned_chat, base_chat, finetuned_state, base_state])
        # A chat's own trash button empties what it shows: forget that conversation too.
        finetuned_chat.clear(lambda: [], None, finetuned_state)
        base_chat.clear(lambda: [], None, base_state)
    return app
