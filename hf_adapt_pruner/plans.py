"""How a layer meets its parameter budget: its geometry, and the plans that pick which units go.

Pure functions on small inputs: no model, no Trainer.

- `ScorePlan` (`allocation="score"`, the default): every removable unit of the layer (a kv group with its query
  heads, or one query head per kv group; a `round_to` block of MLP channels) is ranked by its importance per
  parameter, and the cheapest go first until the layer is within its budget. Attention and MLP compete on one
  scale, so a layer loses a kv group only when its scores say that costs less than the channels it would replace,
  within two limits: attention is not cut deeper than the layer's sparsity, the MLP not past halfway to 1.
- `ProportionalPlan` (`allocation="proportional"`, the paper's code): attention keeps `round(keep * heads)` whole
  heads (or kv groups) and the MLP absorbs the rounding.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import PrunerConfig
from .importance import GroupScores
from .layout import LayerWidths


@dataclass(frozen=True)
class LayerGeometry:
    """A layer's original widths and what one unit of each kind costs in parameters."""

    base: LayerWidths
    q_head_cost: int  # q rows (+ bias) and o columns of one query head
    kv_head_cost: int  # k and v rows (+ biases) of one key/value head
    channel_cost: int  # gate and up rows (+ biases) and the down column of one MLP channel

    def params(self, widths: LayerWidths) -> int:
        return self.attention_params(widths) + widths.intermediate_size * self.channel_cost

    def attention_params(self, widths: LayerWidths) -> int:
        return widths.num_attention_heads * self.q_head_cost + widths.num_key_value_heads * self.kv_head_cost

    def prunable(self, widths: LayerWidths, config: PrunerConfig) -> int:
        """Parameters of the kinds `config` prunes (attention, MLP or both)."""
        mlp = widths.intermediate_size * self.channel_cost
        return self.attention_params(widths) * config.prune_attention + mlp * config.prune_mlp

    def prunable_base(self, config: PrunerConfig) -> int:
        return self.prunable(self.base, config)


def _round_to_multiple(value: float, multiple: int) -> int:
    return round(value / multiple) * multiple


def _attention_floors(heads: int, kv: int, config: PrunerConfig) -> tuple[int, int]:
    """(fewest kv groups, fewest query heads per kv group) a layer may keep."""
    group = heads // kv
    return max(config.min_kv_heads, math.ceil(config.min_heads / group)), max(1, math.ceil(config.min_heads / kv))


def widths_for_sparsity(
    geometry: LayerGeometry, current: LayerWidths, sparsity: float, config: PrunerConfig
) -> LayerWidths:
    """Proportional allocation: the widths a layer has at `sparsity`, never wider than `current`, never below the
    floors. Attention is rounded to whole heads (or kv groups) in proportion to the sparsity; the MLP takes the rest
    of the budget."""
    keep = 1.0 - sparsity
    base = geometry.base
    budget = keep * geometry.prunable_base(config)
    heads, kv = current.num_attention_heads, current.num_key_value_heads
    if config.prune_attention:
        group = heads // kv  # query heads per kv head; whole groups go, so the ratio never changes
        kv_floor, per_group_floor = _attention_floors(heads, kv, config)
        if config.attention_unit == "kv_group":
            kv = min(kv, max(kv_floor, round(keep * base.num_key_value_heads)))
            heads = kv * group
        else:  # query_head: the same number of query heads leaves every kv group
            wanted = round(keep * base.num_attention_heads / base.num_key_value_heads)
            heads = min(group, max(per_group_floor, wanted)) * kv
        budget -= geometry.attention_params(LayerWidths(heads, kv, 0))
    channels = current.intermediate_size
    if config.prune_mlp:
        wanted = _round_to_multiple(budget / geometry.channel_cost, config.round_to)
        channels = min(channels, max(min(config.min_intermediate_size, channels), wanted))
    return LayerWidths(heads, kv, channels)


def min_widths(geometry: LayerGeometry, current: LayerWidths, config: PrunerConfig) -> LayerWidths:
    """The narrowest a layer may become (floors and `max_layer_sparsity`)."""
    return widths_for_sparsity(geometry, current, config.max_layer_sparsity, config)


# ---------------------------------------------------------------------------------------------------------------
# Layer plans: how a layer meets its budget, and what it can give back when an event lands below its target
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Growth:
    """One unit a layer can take back: its widths afterwards, its cost, and how valuable it is."""

    widths: LayerWidths
    cost: int
    value: float


class LayerPlan(Protocol):
    geometry: LayerGeometry
    current: LayerWidths  # the layer's widths when the plan was made

    def widths(self, sparsity: float) -> LayerWidths: ...

    def grow(self, widths: LayerWidths, room: int) -> Growth | None:
        """The most valuable unit removed in this step that costs at most `room` parameters, given back."""


class ProportionalPlan:
    """`widths_for_sparsity`; gives back `round_to` MLP channels at a time, most important layers first."""

    def __init__(self, geometry: LayerGeometry, current: LayerWidths, importance: float, config: PrunerConfig):
        self.geometry, self.current, self.importance, self.config = geometry, current, importance, config

    def widths(self, sparsity: float) -> LayerWidths:
        return widths_for_sparsity(self.geometry, self.current, sparsity, self.config)

    def grow(self, widths: LayerWidths, room: int) -> Growth | None:
        add = min(self.config.round_to, self.current.intermediate_size - widths.intermediate_size)
        if not self.config.prune_mlp or add <= 0 or add * self.geometry.channel_cost > room:
            return None
        wider = LayerWidths(widths.num_attention_heads, widths.num_key_value_heads, widths.intermediate_size + add)
        return Growth(wider, add * self.geometry.channel_cost, self.importance)


@dataclass(frozen=True)
class _Unit:
    size: int  # channels of an MLP block (an attention unit is one kv group, or one query head per kv group)
    cost: int
    score: float

    @property
    def value(self) -> float:
        return self.score / self.cost


def kv_group_scores(scores: GroupScores) -> torch.Tensor:
    """(kv,) score of each kv head together with the query heads that read it (`h // group`, as `repeat_kv`)."""
    kv = scores.kv_heads.numel()
    return scores.kv_heads.double() + scores.q_heads.double().view(kv, -1).sum(dim=1)


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices from least to most important: the reverse of `select_top`'s keep order (ties: higher index first)."""
    return torch.sort(-scores.double(), stable=True).indices.flip(0)


class ScorePlan:
    """Removes the layer's units in order of importance per parameter, attention and MLP on one scale.

    Each kind's units are in ascending value (score per parameter), and the two lists are merged into a ladder: rung
    `k` is the layer after its `k` cheapest units are gone. `widths(s)` climbs to the first rung within the budget of
    sparsity `s`. `grow` offers back the most valuable unit removed so far that fits: the last removed attention
    unit or the last removed MLP block.

    Attention is never cut deeper than the layer's own sparsity: at sparsity `s` a layer of `n` attention units (kv
    groups, or query heads per kv group) has lost at most `floor(s * n)` of them. First-order scores are reliable for
    small changes, and a kv group is a large one: the three kv groups of SmolLM2's first layer score within 1.3 times
    of each other, while zeroing them costs 0.02 to 1.2 in loss (benchmarks/taylor_scale.py). Within that share, the
    scores choose between attention and channels.

    The MLP has the mirror limit: it is not cut deeper than halfway from the layer's sparsity to 1. The scores rank
    SmolLM2's channels cheaper than its kv groups in most layers; at keep 0.5 that cut its MLPs to 15 % and the
    one-shot perplexity was worse than the proportional rule's, with the line it is lower
    (benchmarks/one_shot_quality.py). The line gives way when the attention share is used up.
    """

    def __init__(self, geometry: LayerGeometry, current: LayerWidths, scores: GroupScores, config: PrunerConfig):
        self.geometry, self.current, self.config = geometry, current, config
        self.base_budget = geometry.prunable_base(config)
        self.current_prunable = geometry.prunable(current, config)
        self.attention = self._attention_units(scores)
        self.mlp = self._mlp_units(scores)
        self.mlp_removed = [0, *itertools.accumulate(unit.size for unit in self.mlp)]  # channels gone after m units
        self.attention_base = self._attention_units_of(geometry.base)
        self.attention_gone = self.attention_base - self._attention_units_of(current)
        self._ladders: dict[int, tuple[list[LayerWidths], list[int]]] = {}

    def _attention_units_of(self, widths: LayerWidths) -> int:
        """Attention units (kv groups, or query heads per kv group) a layer of these widths has."""
        if self.config.attention_unit == "kv_group":
            return widths.num_key_value_heads
        return widths.num_attention_heads // widths.num_key_value_heads

    def _ladder(self, attention_cap: int) -> tuple[list[LayerWidths], list[int]]:
        """(rungs, parameters removed at each) when at most `attention_cap` attention units may go."""
        if attention_cap not in self._ladders:
            units = [(u.value, 0, u.cost) for u in self.attention[:attention_cap]]
            units += [(u.value, 1, u.cost) for u in self.mlp]
            counts, rungs, removed = [0, 0], [self.current], [0]
            for _, kind, cost in sorted(units, key=lambda unit: unit[0]):  # stable: each kind keeps its order
                counts[kind] += 1
                rungs.append(self._widths(*counts))
                removed.append(removed[-1] + cost)
            self._ladders[attention_cap] = rungs, removed
        return self._ladders[attention_cap]

    def _attention_units(self, scores: GroupScores) -> list[_Unit]:
        if not self.config.prune_attention:
            return []
        heads, kv = self.current.num_attention_heads, self.current.num_key_value_heads
        group = heads // kv
        kv_floor, per_group_floor = _attention_floors(heads, kv, self.config)
        g = self.geometry
        if self.config.attention_unit == "kv_group":
            group_scores = kv_group_scores(scores)
            cost = group * g.q_head_cost + g.kv_head_cost
            return [_Unit(1, cost, float(group_scores[j]))
                    for j in removal_order(group_scores)[: max(0, kv - kv_floor)]]  # fmt: skip
        # query_head: unit r takes the r-th least important query head out of every kv group
        q = scores.q_heads.double().view(kv, group)
        ascending = torch.stack([q[j][removal_order(q[j])] for j in range(kv)])  # (kv, group)
        return [_Unit(1, kv * g.q_head_cost, float(ascending[:, r].sum()))
                for r in range(max(0, group - per_group_floor))]  # fmt: skip

    def _mlp_units(self, scores: GroupScores) -> list[_Unit]:
        if not self.config.prune_mlp:
            return []
        channels, round_to = self.current.intermediate_size, self.config.round_to
        removable = channels - min(self.config.min_intermediate_size, channels)
        ordered = scores.channels.double()[removal_order(scores.channels)][:removable]
        first = channels % round_to  # the first unit brings the width down to a multiple of round_to
        bounds = [0, first] if 0 < first <= removable else [0]
        bounds += range(first + round_to, removable + 1, round_to)
        cost = self.geometry.channel_cost
        return [_Unit(end - start, (end - start) * cost, float(ordered[start:end].sum()))
                for start, end in itertools.pairwise(bounds)]  # fmt: skip

    def _widths(self, attention_units: int, mlp_units: int) -> LayerWidths:
        """The layer after its `attention_units` and `mlp_units` cheapest units of each kind are gone."""
        heads, kv, channels = self.current.as_tuple()
        group = heads // kv
        if self.config.attention_unit == "kv_group":
            heads, kv = heads - attention_units * group, kv - attention_units
        else:
            heads -= attention_units * kv
        return LayerWidths(heads, kv, channels - self.mlp_removed[mlp_units])

    def widths(self, sparsity: float) -> LayerWidths:
        need = self.current_prunable - (1.0 - sparsity) * self.base_budget  # parameters to remove
        if need <= 0:
            return self.current
        cap = min(max(math.floor(sparsity * self.attention_base + 1e-9) - self.attention_gone, 0), len(self.attention))
        rungs, removed = self._ladder(cap)
        chosen = rungs[min(bisect_left(removed, need), len(rungs) - 1)]
        return self._spare_mlp(chosen, need, cap, sparsity)

    def _spare_mlp(self, chosen: LayerWidths, need: float, cap: int, sparsity: float) -> LayerWidths:
        """`chosen`, or if it cuts the MLP deeper than halfway from the layer's sparsity to 1, the layer with the
        fewest more attention units gone (within `cap`) that keeps the MLP above that line and meets `need`."""
        base = self.geometry.base.intermediate_size
        keep_at_least = min(base - math.floor((1.0 + sparsity) / 2 * base), self.current.intermediate_size)
        if chosen.intermediate_size >= keep_at_least:
            return chosen
        attention_cost = [0, *itertools.accumulate(unit.cost for unit in self.attention)]
        gone = self._attention_units_of(self.current) - self._attention_units_of(chosen)
        for a in range(gone + 1, cap + 1):
            m = bisect_left(self.mlp_removed, (need - attention_cost[a]) / self.geometry.channel_cost)
            if m < len(self.mlp_removed) and self.current.intermediate_size - self.mlp_removed[m] >= keep_at_least:
                return self._widths(a, m)
        return chosen  # no attention unit left to give: the budget wins over the MLP's line

    def grow(self, widths: LayerWidths, room: int) -> Growth | None:
        a = self._attention_units_of(self.current) - self._attention_units_of(widths)
        m = self.mlp_removed.index(self.current.intermediate_size - widths.intermediate_size)
        options = []
        if a > 0:
            options.append(Growth(self._widths(a - 1, m), self.attention[a - 1].cost, self.attention[a - 1].value))
        if m > 0:
            options.append(Growth(self._widths(a, m - 1), self.mlp[m - 1].cost, self.mlp[m - 1].value))
        return max((o for o in options if o.cost <= room), key=lambda o: o.value, default=None)


def layer_plans(
    geometries: Sequence[LayerGeometry],
    current: Sequence[LayerWidths],
    scores: Sequence[GroupScores],
    importance: torch.Tensor,
    config: PrunerConfig,
) -> list[LayerPlan]:
    if config.allocation == "proportional":
        return [ProportionalPlan(g, w, float(i), config) for g, w, i in zip(geometries, current, importance)]
    return [ScorePlan(g, w, s, config) for g, w, s in zip(geometries, current, scores)]
