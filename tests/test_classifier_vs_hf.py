"""The LoRA classifier, step by step, against transformers' Trainer + PEFT on the same rows (issue 21).

Both sides start from the same weights and see the same rows in the same order, with nothing random
left: a BERT classifier saved WITH its head (no head initialised at load time), dropout 0 in the
model config and in LoRA, finetune's initial adapter copied into PEFT's. finetune runs through its
CLI (``recipe=lora-classifier``, metrics every step); the order it trains on is its feed's
(``MapFeed.steps``: each batch's ``row_ids``, from ``BatchPlan`` and the seed), read from a Trainer
set up in-process with the same overrides, which also gives the initial weights. HF gets a sampler
yielding exactly that order, ``DataCollatorWithPadding`` and the same optimiser settings (AdamW,
linear decay, no warmup, weight decay 0, clip 1.0, batch 4). Then, per step: loss within 1e-5,
grad norm (before clipping, what both log) within 1e-4, the learning rate each side reports, and the
final adapters within 1e-4. A mismatch names the first step where the two sides part.

The 26 training rows make 6 steps an epoch (2 rows left over), so the 8 steps cross an epoch
boundary and follow finetune's reshuffle into epoch 2.

Found (2026-12-03, torch 2.13 CPU, transformers 5.24, peft 0.21): losses, grad norms and the final
adapter equal bit for bit; the lr of finetune's metrics rows was the NEXT step's (read from the
scheduler after it stepped), now the one the step trained with, as HF reports it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_helpers import build_trainer, read_metrics, run_cli

pytestmark = pytest.mark.slow  # a CLI run, an in-process set-up and an HF run: ~1 min on 2 cores

SEED, STEPS, BATCH, LR = 3, 8, 4, 5e-3
LABEL_WORDS = {"animal": ["cat", "dog", "chair"], "colour": ["red", "blue", "green"],
               "sky": ["sun", "moon", "lamp"]}
NAMES = sorted(LABEL_WORDS)  # finetune's class ids: the sorted label names
FILLER = ["the", "a", "is", "very", "good", "bad", "old", "new", "really", "quite", "my", "your"]
LOSS_TOL, NORM_TOL, WEIGHT_TOL, LR_TOL = 1e-5, 1e-4, 1e-4, 1e-12


def labelled_rows(n: int, seed: int) -> list[dict]:
    """Sentences of 2 to 10 words (so batches pad), one label word in each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(NAMES)
        words = rng.choices(FILLER, k=rng.randint(1, 9)) + [rng.choice(LABEL_WORDS[label])]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def build_classifier(base_dir: Path) -> Path:
    """A BERT classifier saved with its head and no dropout anywhere, and finetune's tiny BERT
    tokenizer (WordPiece, [CLS] ... [SEP])."""
    from transformers import BertConfig, BertForSequenceClassification

    from finetune.model.builtin import tiny_bert_tokenizer

    tok = tiny_bert_tokenizer()
    # initializer_range 0.2 (not 0.02): gradient norms of 1.3-4.4, so clip 1.0 acts at every step.
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                        initializer_range=0.2, num_labels=len(NAMES), id2label=dict(enumerate(NAMES)),
                        label2id={n: i for i, n in enumerate(NAMES)})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return base_dir


def overrides(base: Path, train: Path, evals: Path) -> list[str]:
    return ["recipe=lora-classifier", f"model.name_or_path={base}", f"data.path={train}",
            "data.format=classification", f"data.eval_split={evals}", f"seed={SEED}", f"optim.lr={LR}",
            "optim.scheduler=linear", "optim.warmup_steps=0", "optim.warmup_ratio=0", "optim.weight_decay=0",
            "optim.max_grad_norm=1.0", "peft.dropout=0", f"trainer.max_steps={STEPS}",
            f"trainer.micro_batch_size={BATCH}", "trainer.grad_accum=1", "trainer.log_steps=1",
            "trainer.eval_steps=0", "trainer.save_steps=0", "trainer.progress=false", "logger.plots=false"]


def finetune_start(args: list[str], run_dir: Path):
    """finetune's row order (row ids per step, from its feed), its initial trainable weights, its
    rows (token ids, class ids) and its config: a Trainer set up in-process like the CLI's."""
    trainer = build_trainer(args, run_dir)
    model = trainer.acc.unwrap_model(trainer.model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    feed = trainer.feed.steps(0)
    order = [[i for batch in next(feed) for i in batch["row_ids"]] for _ in range(STEPS)]
    rows = [(list(map(int, trainer.data.train[i]["input_ids"])), int(trainer.data.train[i]["class_label"]))
            for i in range(len(trainer.data.train))]
    return order, start, rows, trainer.cfg, list(trainer.data.label_names)


def hf_run(base: Path, texts: list[str], labels: list[int], order: list[list[int]], start: dict, cfg,
           out: Path):
    """transformers Trainer + PEFT from ``start``, fed ``order``; its log rows, batches and model."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)

    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(NAMES), id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)})
    # As finetune/model/load.py wrap_peft sets it for a pretrained base: the model group's targets,
    # no modules_to_save of its own (PEFT's SEQ_CLS default: the classifier head trains in full).
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
        target_modules=list(cfg.model.lora_target_modules), use_rslora=cfg.peft.use_rslora))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n: tuple(p.shape) for n, p in trainable.items()} == {n: tuple(p.shape) for n, p in start.items()}
    seeded_alike = all(torch.equal(trainable[n], start[n]) for n in start)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(start[n])

    enc = tok(texts, truncation=True, max_length=cfg.data.max_seq_len, return_token_type_ids=False)
    seen: list[list[list[int]]] = []
    pad = DataCollatorWithPadding(tok)

    def collate(features):
        seen.append([list(f["input_ids"]) for f in features])
        return pad(features)

    class SameOrder(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([i for step in order for i in step])

        def __len__(self):
            return sum(map(len, order))

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SameOrder()

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=STEPS,
        learning_rate=cfg.optim.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps, optim="adamw_torch", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    dataset = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": label}
               for i, label in enumerate(labels)]
    trainer = SameOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r and "grad_norm" in r]
    return logs, seen, trainer.model, seeded_alike, enc["input_ids"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls-vs-hf")
    base = build_classifier(tmp / "classifier")
    train_rows, eval_rows = labelled_rows(26, 0), labelled_rows(6, 1)
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    evals = tmp / "eval.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    args = overrides(base, train, evals)
    run = tmp / "run"
    run_cli(args + [f"output_dir={run}"], check=True, timeout=300)
    order, start, rows, cfg, names = finetune_start(args, tmp / "start")
    assert names == NAMES
    labels = [NAMES.index(r["label"]) for r in train_rows]
    logs, seen, hf_model, seeded_alike, hf_ids = hf_run(
        base, [r["text"] for r in train_rows], labels, order, start, cfg, tmp / "hf")
    ours = [r for r in read_metrics(run) if "loss" in r]
    print(f"PEFT seeded like finetune already had finetune's initial adapter: {seeded_alike}")
    return dict(run=run, order=order, rows=rows, labels=labels, hf_ids=hf_ids, logs=logs, seen=seen,
                hf_model=hf_model, ours=ours)


def first_divergence(name: str, ours: list[float], theirs: list[float], tol: float) -> str | None:
    """None when every step agrees within ``tol``, else the first step that does not and the table
    (printed either way: ``pytest -s`` shows the per-step differences)."""
    table = "\n".join(f"  step {k + 1}: finetune {a:.8g}  hf {b:.8g}  diff {abs(a - b):.2e}"
                      for k, (a, b) in enumerate(zip(ours, theirs)))
    print(f"{name}:\n{table}")
    bad = [k for k, (a, b) in enumerate(zip(ours, theirs)) if abs(a - b) > tol]
    return f"{name}: first divergence at step {bad[0] + 1} (tolerance {tol}):\n{table}" if bad else None


def test_both_sides_train_the_same_rows_in_the_same_order(both):
    """The premise of the comparison: the same token ids and labels per row, and HF's batches are
    finetune's steps, row for row (finetune's epoch 2 reshuffle included)."""
    assert [ids for ids, _ in both["rows"]] == both["hf_ids"]
    assert [label for _, label in both["rows"]] == both["labels"]
    assert len(both["seen"]) == STEPS
    assert both["seen"] == [[both["rows"][i][0] for i in step] for step in both["order"]]
    first_epoch = [i for step in both["order"][:6] for i in step]
    assert len(set(first_epoch)) == 24  # 6 steps of distinct rows, then a new permutation


def test_loss_and_grad_norm_match_step_by_step(both):
    ours, logs = both["ours"], both["logs"]
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    problems = [
        first_divergence("loss", [r["loss"] for r in ours], [r["loss"] for r in logs], LOSS_TOL),
        first_divergence("grad_norm", [r["grad_norm"] for r in ours], [r["grad_norm"] for r in logs], NORM_TOL)]
    assert not any(problems), "\n".join(p for p in problems if p)
    # The run moved: clipping acted at every step and the loss changed, so a match is not two idle runs.
    assert min(r["grad_norm"] for r in ours) > 1.0
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3


def test_final_adapters_match(both):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    ours = load_file(str(both["run"] / "final" / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(both["hf_model"])
    assert sorted(ours) == sorted(theirs)
    diffs = {k: float((ours[k] - theirs[k].detach().cpu()).abs().max()) for k in ours}
    worst = max(diffs, key=diffs.get)
    print(f"final adapter: {len(diffs)} tensors, largest |diff| {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= WEIGHT_TOL, f"{worst}: max |diff| {diffs[worst]:.2e}"
    config = json.loads((both["run"] / "final" / "adapter_config.json").read_text())
    hf_config = both["hf_model"].peft_config["default"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == \
        (hf_config.r, hf_config.lora_alpha, hf_config.lora_dropout)
    assert sorted(config["target_modules"]) == sorted(hf_config.target_modules)
    assert config["modules_to_save"] == list(hf_config.modules_to_save)  # the head: PEFT's SEQ_CLS default


def test_reported_learning_rate_matches_per_step(both):
    """Each side's metrics row for step k carries the learning rate that step trained with."""
    ours = [r["lr"] for r in both["ours"]]
    theirs = [r["learning_rate"] for r in both["logs"]]
    problem = first_divergence("lr", ours, theirs, LR_TOL)
    assert problem is None, problem
    assert theirs[0] == pytest.approx(LR)  # no warmup: step 1 at the peak
