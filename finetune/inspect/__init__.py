"""``stage=inspect``: what the model would be trained on, without training (every task).

Writes into the run dir (``output_dir``):

- ``inspect.html`` — a self-contained page: the first ``inspect.examples`` training records token by
  token, supervised tokens (labels != -100: assistant turns, a preference pair's completions, a
  KTO completion; a classifier's label name in the title) highlighted, per-sequence token counts,
  the data figures, the template checks and the length histogram;
- ``inspect_lengths.png`` — sequence lengths before and after ``data.max_seq_len``.

The console shows the same examples (rich colours on a terminal), the figures and one line per
template finding (warnings name the example and turn; template_checks.py lists the checks). The
examples are encoded one record at a time by the task's own ``encode``, so what is shown is what
training sees; the figures are the data pipeline's counts (the cache a later run reuses).
"""

from __future__ import annotations

import logging
import numpy as np
from omegaconf import DictConfig, OmegaConf

from finetune.data.records import FormattedItems, format_records, read_records
from finetune.data.tokenize import Stats
from finetune.errors import ConfigError
from finetune.inspect.lengths import data_figures, plot_lengths
from finetune.inspect.render import html_page, print_examples
from finetune.inspect.template_checks import (conversation_findings, sequence_findings,
                                              template_findings)

log = logging.getLogger(__name__)
UNLIMITED = 1 << 30


def _untruncated(cfg: DictConfig) -> DictConfig:
    """The config with no length limit: the lengths as the records render."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.data.max_seq_len, cfg.data.overlong = UNLIMITED, "truncate"
    return cfg


def view_lengths(task, encoded, label_names) -> np.ndarray:
    return np.array([len(v.ids) for i in range(len(encoded))
                     for v in task.inspect_views(encoded, i, label_names)], dtype=np.int64)


def _one(items: FormattedItems, i: int) -> FormattedItems:
    one = FormattedItems()
    one.append(items[i])
    one.origins.append(items.origins[i])
    return one


def inspect_examples(cfg: DictConfig, task, tokenizer, items: FormattedItems, label_names):
    """The first ``inspect.examples`` records, each encoded alone as training encodes it:
    ([(name, views)], template findings)."""
    examples, findings, chats = [], [], False
    for i in range(min(cfg.inspect.examples, len(items))):
        name = f"example {i} ({items.origins[i]})"
        encoded, _ = task.encode(tokenizer, _one(items, i), Stats(), label_names)
        views = [v for k in range(len(encoded)) for v in task.inspect_views(encoded, k, label_names)]
        examples.append((name, views))
        for view in views:
            findings += sequence_findings(tokenizer, f"{name} {view.title}", view.ids, view.labels)
        for chat in task.chats(items[i]):
            chats = True
            findings += conversation_findings(tokenizer, cfg.data.chat_date, name, chat)
    if chats:
        findings = template_findings(tokenizer, cfg.data.chat_date) + findings
    return examples, findings


def run_inspect(cfg: DictConfig) -> int:
    from finetune.data import prepare_data
    from finetune.model.load import load_tokenizer
    from finetune.tasks import get_task
    from finetune.train.run_dir import resolve_run_dir

    if cfg.data.streaming:
        raise ConfigError("stage=inspect reads the data whole (lengths, counts): run it with "
                          "data.streaming=false")
    task = get_task(cfg)
    tokenizer = load_tokenizer(cfg, task)
    run_dir = resolve_run_dir(cfg)
    data = prepare_data(cfg, tokenizer, task)  # the pipeline's counts, cached for the training run
    items = format_records(cfg, read_records(cfg), Stats())
    untruncated, _ = get_task(_untruncated(cfg)).encode(tokenizer, items, Stats(), data.label_names)
    before = view_lengths(task, untruncated, data.label_names)
    after = view_lengths(task, data.train.encoded, data.label_names)
    image = plot_lengths(before, after, cfg.data.max_seq_len, run_dir / "inspect_lengths.png")
    examples, findings = inspect_examples(cfg, task, tokenizer, items, data.label_names)
    figures = data_figures(data.stats, before, after)
    print_examples(examples, tokenizer)
    for key, value in figures.items():
        log.info("%s: %s", key, value)
    for finding in findings:
        log.log(finding.level, finding.message)
    page = html_page(f"stage=inspect: {cfg.recipe}", examples, tokenizer, figures, findings,
                     image.read_bytes())
    (run_dir / "inspect.html").write_text(page)
    warnings = sum(f.warning for f in findings)
    log.info("inspect: %s and %s written (%d template warning%s)", run_dir / "inspect.html",
             image.name, warnings, "" if warnings == 1 else "s")
    return 0
