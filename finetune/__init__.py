"""finetune: distributed fine-tuning on the Hugging Face stack.

One run: ``python -m finetune recipe=lora-llm`` -> Hydra composes ``conf/`` + ``recipes/`` into a
validated :class:`finetune.config.RunConfig` -> data (``finetune.data``) -> model + PEFT
(``finetune.model``) -> the training loop (``finetune.trainer``) -> checkpoints
(``finetune.checkpoint``) and outputs in the run dir.
"""

__version__ = "0.1.0"
