"""The model: load a tokenizer and a transformers model (built-in, Hub id or local path), set its
dtype and attention, wrap it with PEFT (``load.py``); the built-in tiny models (``builtin.py``);
packed-row attention (``attention.py``); the LM head + loss in chunks (``linear_cross_entropy.py``)."""
