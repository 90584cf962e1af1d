"""The run's state: what changes as it trains, and exactly what a checkpoint stores of it.

Weights, optimizer, schedule and RNG live in their own checkpoint files (train/checkpoint.py);
everything else a resumed run needs is a :class:`RunState`, saved as ``trainer_state.json`` next
to the facts that decide whether a checkpoint may be resumed (:class:`ResumeKey`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding tokens trained on, all ranks
    best_eval: float | None = None  # lowest eval_loss so far, and its step
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # train (step, loss, tokens/s) and eval rows
    tracker_ids: dict[str, str] = field(default_factory=dict)  # tracker name -> its run id
    skipped_steps: int = 0  # steps not applied: NaN / inf loss or gradients (trainer.nonfinite=skip_step)
    feed_state: dict | None = None  # a stream's position (map-style data: the step fixes it)

    def record_eval(self, row: dict) -> bool:
        """Remember an eval row; True when it is the best eval loss so far."""
        self.history.append(row)
        improved = self.best_eval is None or row["eval_loss"] < self.best_eval
        if improved:
            self.best_eval, self.best_step = row["eval_loss"], self.step
        return improved

    def to_json(self, key: "ResumeKey", steps_per_epoch: int) -> dict:
        """``trainer_state.json``: the state, the resume key and the position in epochs."""
        epoch, in_epoch = divmod(self.step, steps_per_epoch)
        out = {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch,
               "tokens_seen": self.tokens_seen, **asdict(key), "best_eval": self.best_eval,
               "best_step": self.best_step, "tracker_ids": self.tracker_ids, "history": self.history,
               "skipped_steps": self.skipped_steps}
        if self.feed_state is not None:
            out["data_stream"] = self.feed_state
        return out

    @classmethod
    def from_json(cls, state: dict) -> "RunState":
        return cls(step=state["step"], tokens_seen=state["tokens_seen"],
                   best_eval=state.get("best_eval"), best_step=state.get("best_step"),
                   history=state.get("history", []), tracker_ids=state.get("tracker_ids", {}),
                   skipped_steps=state.get("skipped_steps", 0),
                   feed_state=state.get("data_stream"))


@dataclass
class ResumeKey:
    """What must match for a checkpoint to resume this run exactly (checked on resume)."""

    rows_per_step: int
    world_size: int
    data_key: str  # the data cache entry's name: the same data, tokenizer and lengths
    config_hash: dict  # {"model": hash of model/peft, "run": hash of data/optim/trainer/seed}
