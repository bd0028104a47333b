"""`PruneReport`: what a prune event did, as data (JSON) and as a table; the run's event log `prune_events.json`."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .layout import LayerWidths


logger = logging.get_logger(__name__)

EVENTS_FILE = "prune_events.json"


@dataclass
class LayerReport:
    index: int
    before: LayerWidths
    after: LayerWidths
    importance: float  # centred, scaled layer importance in [-1, 1] (last measurement)
    sparsity: float  # the layer's Adapt-Pruner sparsity state after the event

    def describe(self) -> str:
        b, a = self.before, self.after
        return (
            f"layer {self.index}: heads {b.num_attention_heads}/{b.num_key_value_heads} -> "
            f"{a.num_attention_heads}/{a.num_key_value_heads}, mlp {b.intermediate_size} -> {a.intermediate_size}"
        )


@dataclass
class PruneReport:
    params_before: int
    params_after: int
    target_params: int
    layers: list[LayerReport] = field(default_factory=list)
    inner_steps: int = 0
    wall_time_s: float = 0.0
    reconstruction_tokens: int = 0  # input tokens behind the least-squares refit (all ranks); 0: no refit

    @property
    def ratio(self) -> float:
        """Parameters kept by this event, as a fraction of those before it."""
        return self.params_after / self.params_before

    @property
    def layer_importance(self) -> list[float]:
        return [layer.importance for layer in self.layers]

    def describe_changes(self) -> list[str]:
        return [layer.describe() for layer in self.layers if layer.before != layer.after]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        """A fixed-width per-layer table (Markdown-compatible)."""
        lines = [
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({self.ratio:.1%}; target "
            f"{self.target_params:,}), {self.inner_steps} inner steps, {self.wall_time_s:.1f} s",
            "",
            "| layer | importance | heads | kv heads | intermediate |",
            "|---:|---:|---:|---:|---:|",
        ]
        for layer in self.layers:
            b, a = layer.before, layer.after
            lines.append(
                f"| {layer.index} | {layer.importance:+.3f} | {b.num_attention_heads} -> {a.num_attention_heads} "
                f"| {b.num_key_value_heads} -> {a.num_key_value_heads} "
                f"| {b.intermediate_size} -> {a.intermediate_size} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def record_event(folder: str | os.PathLike, event: dict[str, Any]) -> Path:
    """Add one prune event to `folder/prune_events.json`, a JSON list with one object per event, and return its path.

    Entries of the same or a later stage are dropped first: a fresh run in the same folder starts the list again at
    stage 1, and a resumed run replaces the events that ran after its checkpoint. Written to a temporary file, then
    renamed over the old one, so a reader (or a crash) never sees half a file. The per-layer widths and importances
    live here rather than in the Trainer's logs, which show and forward scalars.
    """
    path = Path(folder) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    events = []
    if path.exists():
        try:
            events = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            logger.warning(f"{path} is not valid JSON ({error}): starting it again with this event.")
    events = events if isinstance(events, list) else []
    kept = [e for e in events if isinstance(e, dict) and e.get("stage", 0) < event["stage"]]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps([*kept, event], indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class TensorBoardTables:
    """Per-layer tables of prune events for the `report_to="tensorboard"` callbacks of a Trainer, sent to their Text
    tab (Markdown) once their writers are open: by the first log, also for an event at step 0 that ran before
    TensorBoard's `on_train_begin`. Other integrations take tables only through their own modules."""

    def __init__(self):
        self.pending: list[tuple[int, str]] = []  # (step, Markdown)

    @staticmethod
    def _callbacks(trainer) -> list:
        from transformers.integrations import TensorBoardCallback

        callbacks = trainer.callback_handler.callbacks if trainer is not None else []
        return [c for c in callbacks if isinstance(c, TensorBoardCallback)]

    def add(self, trainer, step: int, table: str) -> None:
        if self._callbacks(trainer):
            self.pending.append((step, table))

    def send(self, trainer) -> None:
        writers = [c.tb_writer for c in self._callbacks(trainer) if c.tb_writer is not None]
        if not self.pending or not writers:
            return  # kept for a later log
        for step, table in self.pending:
            for writer in writers:
                writer.add_text("prune/layers", table, step)
        self.pending = []
