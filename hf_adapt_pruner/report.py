"""`PruneReport`: what a prune event did, as data (JSON) and as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .layout import LayerWidths


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
