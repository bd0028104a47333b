"""Per-layer sparsity (the adaptive part of Adapt-Pruner) and the widths and indices it implies.

Pure functions on small inputs: no model, no Trainer.

The paper's update, for layer `i` at one inner step:

    s_i <- clamp(s_i + delta - A * I_i, 0, max_layer_sparsity)

Widths follow from a layer's sparsity in parameter units: the layer's prunable parameters are budgeted to
`(1 - s_i) * base`, attention is rounded to whole heads (or kv groups) and the MLP absorbs the rounding, so a
layer lands on its budget even though heads are coarse. The last inner step of an event is solved (bisection on
the step size) so that the model's count lands on the target instead of overshooting it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import PrunerConfig
from .layout import LayerWidths


@dataclass(frozen=True)
class LayerGeometry:
    """A layer's original widths and what one unit of each kind costs in parameters."""

    base: LayerWidths
    q_head_cost: int  # q rows (+ bias) and o columns of one query head
    kv_head_cost: int  # k and v rows (+ biases) of one key/value head
    channel_cost: int  # gate and up rows (+ biases) and the down column of one MLP channel

    def params(self, widths: LayerWidths) -> int:
        return (
            widths.num_attention_heads * self.q_head_cost
            + widths.num_key_value_heads * self.kv_head_cost
            + widths.intermediate_size * self.channel_cost
        )

    def prunable_base(self, config: PrunerConfig) -> int:
        attention = (
            self.base.num_attention_heads * self.q_head_cost + self.base.num_key_value_heads * self.kv_head_cost
        )
        mlp = self.base.intermediate_size * self.channel_cost
        return attention * config.prune_attention + mlp * config.prune_mlp


def _round_to_multiple(value: float, multiple: int) -> int:
    return round(value / multiple) * multiple


def widths_for_sparsity(
    geometry: LayerGeometry, current: LayerWidths, sparsity: float, config: PrunerConfig
) -> LayerWidths:
    """The widths a layer should have at `sparsity`, never wider than `current` and never below the floors."""
    keep = 1.0 - sparsity
    base = geometry.base
    budget = keep * geometry.prunable_base(config)
    heads, kv = current.num_attention_heads, current.num_key_value_heads
    if config.prune_attention:
        if config.attention_unit == "kv_group":
            group = heads // kv  # query heads per kv head; whole groups go, so the ratio never changes
            floor = max(config.min_kv_heads, math.ceil(config.min_heads / group))
            kv = min(kv, max(floor, round(keep * base.num_key_value_heads)))
            heads = kv * group
        else:  # query_head: the same number of query heads leaves every kv group
            floor = max(1, math.ceil(config.min_heads / kv))
            per_group = min(heads // kv, max(floor, round(keep * base.num_attention_heads / base.num_key_value_heads)))
            heads = per_group * kv
        budget -= heads * geometry.q_head_cost + kv * geometry.kv_head_cost
    channels = current.intermediate_size
    if config.prune_mlp:
        wanted = _round_to_multiple(budget / geometry.channel_cost, config.round_to)
        channels = min(channels, max(min(config.min_intermediate_size, channels), wanted))
    return LayerWidths(heads, kv, channels)


def min_widths(geometry: LayerGeometry, current: LayerWidths, config: PrunerConfig) -> LayerWidths:
    """The narrowest a layer may become (floors and `max_layer_sparsity`)."""
    return widths_for_sparsity(geometry, current, config.max_layer_sparsity, config)


def model_params(geometries: Sequence[LayerGeometry], widths: Sequence[LayerWidths], fixed_params: int) -> int:
    return fixed_params + sum(g.params(w) for g, w in zip(geometries, widths))


def normalize_importance(raw: torch.Tensor) -> torch.Tensor:
    """Centre and scale layer importances into [-1, 1] with mean 0 (paper section 1)."""
    centred = raw.double() - raw.double().mean()
    scale = centred.abs().max()
    return centred / scale if scale > 0 else torch.zeros_like(centred)


@dataclass
class StepResult:
    sparsity: torch.Tensor  # (L,) float64, the new per-layer sparsity state
    widths: list[LayerWidths]
    num_parameters: int


def allocation_step(
    geometries: Sequence[LayerGeometry],
    current: Sequence[LayerWidths],
    sparsity: torch.Tensor,
    importance: torch.Tensor,
    delta: float,
    target_params: int,
    fixed_params: int,
    config: PrunerConfig,
    final: bool,
) -> StepResult:
    """One inner step: move every layer's sparsity by `c * (delta - A * I_i)`.

    `c = 1` is the paper's step. If that overshoots the target (or this is the final step and it falls short),
    `c` is solved by bisection for the smallest step whose count is at or below the target, so events land on
    their target instead of jumping past it.
    """
    increment = delta - config.amplitude * importance.double()  # (L,)

    def evaluate(c: float, inc: torch.Tensor = increment) -> StepResult:
        s = (sparsity + c * inc).clamp(0.0, config.max_layer_sparsity)
        widths = [widths_for_sparsity(g, w, float(si), config) for g, w, si in zip(geometries, current, s)]
        return StepResult(s, widths, model_params(geometries, widths, fixed_params))

    step = evaluate(1.0)
    if step.num_parameters > target_params and not final:
        return step
    if step.num_parameters > target_params:  # final step short of the target: find a larger c that reaches it
        hi = 2.0
        while evaluate(hi).num_parameters > target_params and hi < 1e6:
            hi *= 2.0
        if evaluate(hi).num_parameters > target_params:
            # Important layers with a negative increment cannot shrink: fall back to a uniform push.
            increment = torch.full_like(increment, max(delta, 1e-3))
            hi = 1.0
            while evaluate(hi, increment).num_parameters > target_params and hi < 1e6:
                hi *= 2.0
        lo = 0.0
    else:
        lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection: smallest c whose count is <= target
        mid = (lo + hi) / 2
        if evaluate(mid, increment).num_parameters <= target_params:
            hi = mid
        else:
            lo = mid
    return _fill_slack(geometries, current, evaluate(hi, increment), importance, target_params, config)


def _fill_slack(
    geometries: Sequence[LayerGeometry],
    current: Sequence[LayerWidths],
    step: StepResult,
    importance: torch.Tensor,
    target_params: int,
    config: PrunerConfig,
) -> StepResult:
    """Give back MLP channels (not yet removed in this step) while the count stays at or below the target.

    The solved step may land a whole head group below the target (heads are coarse); handing the slack back as
    channels, most important layers first, brings the count to within one `round_to` block of the target.
    """
    if not config.prune_mlp:
        return step
    slack = target_params - step.num_parameters
    widths = list(step.widths)
    for i in torch.sort(-importance.double(), stable=True).indices.tolist():
        block = geometries[i].channel_cost * config.round_to
        room = current[i].intermediate_size - widths[i].intermediate_size
        add = min(room, (slack // block) * config.round_to)
        if add > 0:
            widths[i] = LayerWidths(widths[i].num_attention_heads, widths[i].num_key_value_heads,
                                    widths[i].intermediate_size + add)  # fmt: skip
            slack -= add * geometries[i].channel_cost
    return StepResult(step.sparsity, widths, target_params - slack)


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties go to the lower index)."""
    if keep >= scores.numel():
        return torch.arange(scores.numel())
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:keep]).values


def select_heads(
    q_scores: torch.Tensor, kv_scores: torch.Tensor, target: LayerWidths, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept (query head, kv head) indices. Query head `h` belongs to kv head `h // group`, as `repeat_kv` expects."""
    heads, kv = q_scores.numel(), kv_scores.numel()
    group = heads // kv
    if target.num_key_value_heads < kv:  # kv_group: a kv head goes together with its query heads
        group_scores = kv_scores.double() + q_scores.double().view(kv, group).sum(dim=1)
        keep_kv = select_top(group_scores, target.num_key_value_heads)
        keep_q = (keep_kv[:, None] * group + torch.arange(group)[None, :]).flatten()
        return keep_q, keep_kv
    per_group = target.num_attention_heads // kv
    if per_group < group:  # query_head: the best `per_group` query heads of every kv group
        within = [select_top(q_scores.view(kv, group)[j], per_group) + j * group for j in range(kv)]
        return torch.cat(within), torch.arange(kv)
    return torch.arange(heads), torch.arange(kv)


def check_reachable(
    geometries: Sequence[LayerGeometry],
    current: Sequence[LayerWidths],
    target_params: int,
    fixed_params: int,
    config: PrunerConfig,
) -> None:
    floor_widths = [min_widths(g, w, config) for g, w in zip(geometries, current)]
    floor = model_params(geometries, floor_widths, fixed_params)
    if target_params < floor:
        raise ValueError(
            f"Target of {target_params:,} parameters is unreachable: with the floors (min_heads={config.min_heads}, "
            f"min_kv_heads={config.min_kv_heads}, min_intermediate_size={config.min_intermediate_size}, "
            f"max_layer_sparsity={config.max_layer_sparsity}, prune_attention={config.prune_attention}, "
            f"prune_mlp={config.prune_mlp}) the model cannot go below {floor:,} parameters, of which {fixed_params:,} "
            f"are never pruned (embeddings, norms, lm_head). Raise the target or lower the floors."
        )
