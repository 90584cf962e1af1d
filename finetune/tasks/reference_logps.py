"""Reference log-probs computed once (``pref.precompute_ref=true``) and cached beside the data.

The reference model never changes during a run, so its summed completion log-probs of every
training and eval row can be computed before the first step; a step then runs the policy only.
The table (float32, two values per row, rows in the cache's order: DPO's ``(chosen, rejected)``,
KTO's ``(example, KL sequence)``, finetune/tasks/kto.py) is a safetensors file in the data cache
directory, named by a key of

- the data: the cache directory itself is keyed by the data, template and tokenisation;
- the reference weights: a hash of every parameter of the reference as loaded (the base for LoRA,
  plus the bytes of ``model.adapter_path``'s files when an SFT adapter is the reference), its dtype,
  the attention implementation and the LM-head path (chunked or not).

A resumed run reads the same file, so its reference values are the ones the interrupted run used
(bit-identical resume); another model, adapter, dtype or data gives another file. Rows are
computed in eval mode (no dropout) in micro-batches split over the ranks and summed over them
(one collective per split); rank 0 writes the file atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")


def weights_key(model, adapter_path: str | None, extras: tuple = ()) -> str:
    """A short hash of a model's parameters (names, dtypes, shapes, bytes), the adapter's files and ``extras``."""
    digest = hashlib.blake2b(digest_size=12)
    for name, param in model.state_dict().items():
        t = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if adapter_path:
        for path in sorted(Path(adapter_path).glob("adapter_*")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(repr(extras).encode())
    return digest.hexdigest()


def table_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"reference-logps-{key}.safetensors"


def load_or_compute(trainer, reference_logps, key: str) -> dict[str, torch.Tensor]:
    """``{"train": (rows, 2), "eval": (rows, 2)}`` from the cache file, or computed and written.

    ``reference_logps(model, batch) -> (2n,)`` gives a collated batch's first-column values (DPO:
    chosen; KTO: the examples) then its second-column ones (rejected; the KL sequences).
    """
    from safetensors.torch import load_file, save_file

    path = table_path(trainer.data.cache_dir, key)
    if path.exists():
        table = load_file(path)
        if all(table.get(s, torch.empty(0)).shape[0] == _rows(trainer, s) for s in SPLITS):
            if trainer.is_main:
                log.info("reference log-probs: %s (precomputed)", path)
            return table
        log.warning("reference log-probs %s do not match the data's rows: computing them again", path)
    table = {split: _compute(trainer, reference_logps, split) for split in SPLITS}
    if trainer.is_main:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(table, str(tmp))
        os.replace(tmp, path)
        log.info("reference log-probs: %d train + %d eval rows written to %s", len(table["train"]),
                 len(table["eval"]), path)
    trainer.acc.wait_for_everyone()
    return table


def _rows(trainer, split: str) -> int:
    data = trainer.data.train if split == "train" else trainer.data.eval
    return 0 if data is None else len(data)


@torch.no_grad()
def _compute(trainer, reference_logps, split: str) -> torch.Tensor:
    acc, mb = trainer.acc, trainer.cfg.trainer.micro_batch_size
    data = trainer.data.train if split == "train" else trainer.data.eval
    n = _rows(trainer, split)
    out = torch.zeros((n, 2), dtype=torch.float32, device=acc.device)
    idx = list(range(acc.process_index, n, acc.num_processes))
    chunks = [idx[i:i + mb] for i in range(0, len(idx), mb)]
    # Sharded weights (FSDP / ZeRO-3) make each forward a collective: every rank runs as many.
    most = math.ceil(math.ceil(n / acc.num_processes) / mb) if n else 0
    real = len(chunks)
    chunks += [[0]] * (most - real)
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        for k, rows in enumerate(chunks):
            batch = trainer.to_device(trainer.collate([data[i] for i in rows]))
            with acc.autocast():
                values = reference_logps(model, batch).float()
            if k < real:
                half = len(rows)
                out[rows, 0] = values[:half]
                out[rows, 1] = values[half:]
    finally:
        model.train(was_training)
    if acc.num_processes > 1:
        out = acc.reduce(out, reduction="sum")
    return out.cpu()
