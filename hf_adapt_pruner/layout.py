"""`PrunedLayout`: the per-layer widths of a pruned model, as plain JSON data stored in `config.json` (its history of
kept indices in `pruning_history.json` beside it: `hf_adapt_pruner.history`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


LAYOUT_KEY = "pruned_layout"
MASK_KEY = "pruned_mask"  # mask mode: the layout plus the unmasked units of every layer, on a full-size model
LAYOUT_FORMAT_VERSION = 1


@dataclass
class LayerWidths:
    """How many query heads, key/value heads and MLP channels one decoder layer has."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)


@dataclass
class PrunedLayout:
    """Per-layer widths of a pruned decoder, plus what is needed to continue or replay the pruning.

    Stored in `config.json` under the key `"pruned_layout"`, all but `history`, which is written to
    `pruning_history.json` beside it (models saved by earlier versions kept it in `config.json`; they still load):

    ```json
    {"format_version": 1, "head_dim": 64,
     "num_attention_heads": [9, 6, ...], "num_key_value_heads": [3, 2, ...], "intermediate_size": [1536, 1088, ...],
     "base": {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "num_parameters": ...},
     "sparsity": [0.0, 0.12, ...],
     "history": [{"num_parameters": ..., "layer_importance": [0.41, -1.0, ...],
                  "layers": {"1": {"q_heads": [...], "kv_heads": [...], "channels": [...]}}}]}
    ```

    `history` lists, per prune event, the indices each changed layer KEPT (relative to its widths before that
    event), so a decision can be replayed on a fresh copy of the base model, and the layer importances (centred,
    scaled to [-1, 1]) of the event's last measurement, which the model card plots. `sparsity` is the Adapt-Pruner
    per-layer state that later prune events continue from.
    """

    head_dim: int
    num_attention_heads: list[int]
    num_key_value_heads: list[int]
    intermediate_size: list[int]
    base: dict[str, int] = field(default_factory=dict)
    sparsity: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.num_attention_heads)

    def layer(self, index: int) -> LayerWidths:
        return LayerWidths(
            self.num_attention_heads[index], self.num_key_value_heads[index], self.intermediate_size[index]
        )

    def set_layer(self, index: int, widths: LayerWidths) -> None:
        self.num_attention_heads[index] = widths.num_attention_heads
        self.num_key_value_heads[index] = widths.num_key_value_heads
        self.intermediate_size[index] = widths.intermediate_size

    def to_dict(self, history: bool = True) -> dict[str, Any]:
        """The JSON object; `history=False` leaves the history out (`config.json` holds the rest, the history has its
        own file: `hf_adapt_pruner.history`)."""
        data = {
            "format_version": LAYOUT_FORMAT_VERSION,
            "head_dim": self.head_dim,
            "num_attention_heads": list(self.num_attention_heads),
            "num_key_value_heads": list(self.num_key_value_heads),
            "intermediate_size": list(self.intermediate_size),
            "base": dict(self.base),
            "sparsity": [float(s) for s in self.sparsity],
        }
        if history:
            data["history"] = copy.deepcopy(self.history)
        return data

    @classmethod
    def from_dict(cls, data: Any, num_layers: int | None = None) -> PrunedLayout:
        """Parse and validate a layout read from a config; every error names the key at fault."""
        if not isinstance(data, dict):
            raise ValueError(f"config key {LAYOUT_KEY!r} must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", LAYOUT_FORMAT_VERSION)
        if version != LAYOUT_FORMAT_VERSION:
            raise ValueError(
                f"{LAYOUT_KEY}.format_version={version!r} is not readable by this version of hf_adapt_pruner "
                f"(reads {LAYOUT_FORMAT_VERSION}); upgrade hf_adapt_pruner."
            )
        lists = {}
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = data.get(key)
            if not isinstance(value, list) or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ValueError(f"{LAYOUT_KEY}.{key} must be a list of positive integers, got {value!r}.")
            lists[key] = value
        lengths = {len(v) for v in lists.values()}
        if len(lengths) != 1 or (num_layers is not None and lengths != {num_layers}):
            raise ValueError(
                f"{LAYOUT_KEY}: the per-layer lists have lengths {[len(v) for v in lists.values()]}, but the model "
                f"has "
                f"{num_layers} layers (num_hidden_layers); the layout does not belong to this config."
            )
        head_dim = data.get("head_dim")
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"{LAYOUT_KEY}.head_dim must be a positive integer, got {head_dim!r}.")
        for i, (heads, kv) in enumerate(zip(lists["num_attention_heads"], lists["num_key_value_heads"])):
            if heads % kv:
                raise ValueError(
                    f"{LAYOUT_KEY}: layer {i} has {heads} query heads and {kv} key/value heads; the query heads must "
                    "be a multiple of the key/value heads."
                )
        return cls(
            head_dim=head_dim,
            base=dict(data.get("base", {})),
            sparsity=[float(s) for s in data.get("sparsity", [])],
            history=copy.deepcopy(data.get("history", [])),
            **lists,
        )

    def summary(self) -> str:
        """Compact per-layer widths, e.g. `h 9/3 i 1536 | h 6/2 i 1088 | ...`."""
        return " | ".join(
            f"h {h}/{kv} i {i}"
            for h, kv, i in zip(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)
        )
