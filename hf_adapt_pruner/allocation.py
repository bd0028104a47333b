"""Per-layer sparsity (the adaptive part of Adapt-Pruner), one inner step of it, and the indices it keeps.

Pure functions on small inputs: no model, no Trainer.

The paper's update, for layer `i` at one inner step:

    s_i <- clamp(s_i + delta - A * I_i, 0, max_layer_sparsity)

A layer's sparsity is a parameter budget, `(1 - s_i) * base` of its prunable parameters; a `LayerPlan`
(`hf_adapt_pruner.plans`) decides which units meet it. The last inner step of an event is solved (bisection on the
step size) so that the model's count lands at or below the target, then removed units are handed back, most
valuable first, while the count stays at or below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import PrunerConfig
from .importance import GroupScores
from .layout import LayerWidths
from .plans import Growth, LayerGeometry, LayerPlan, kv_group_scores, min_widths


def model_params(geometries: Sequence[LayerGeometry], widths: Sequence[LayerWidths], fixed_params: int) -> int:
    return fixed_params + sum(g.params(w) for g, w in zip(geometries, widths))


def normalize_importance(raw: torch.Tensor) -> torch.Tensor:
    """Centre and scale layer importances into [-1, 1] with mean 0 (paper section 1)."""
    centred = raw.double() - raw.double().mean()
    scale = centred.abs().max()
    return centred / scale if scale > 0 else torch.zeros_like(centred)


# ---------------------------------------------------------------------------------------------------------------
# One inner step
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    sparsity: torch.Tensor  # (L,) float64, the new per-layer sparsity state
    widths: list[LayerWidths]
    num_parameters: int


def allocation_step(
    plans: Sequence[LayerPlan],
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
    geometries = [plan.geometry for plan in plans]

    def evaluate(c: float, inc: torch.Tensor = increment) -> StepResult:
        s = (sparsity + c * inc).clamp(0.0, config.max_layer_sparsity)
        widths = [plan.widths(float(si)) for plan, si in zip(plans, s)]
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
    return _fill_slack(plans, evaluate(hi, increment), target_params, config)


def _fill_slack(plans: Sequence[LayerPlan], step: StepResult, target_params: int, config: PrunerConfig) -> StepResult:
    """Give back units removed in this step, most valuable first, while the count stays at or below the target.

    The solved step may land up to one coarse unit (a kv group) below the target; handing back what fits brings the
    count to within the smallest unit of the target. If `round_to` blocks are still too coarse for
    `target_tolerance` (small layers), the layer with the most channels removed in this step takes back single
    channels, so its width is not a multiple of `round_to`.
    """
    slack = target_params - step.num_parameters
    widths = list(step.widths)
    while True:
        best: tuple[int, Growth] | None = None
        for i, plan in enumerate(plans):
            growth = plan.grow(widths[i], slack)
            if growth is not None and (best is None or growth.value > best[1].value):
                best = (i, growth)
        if best is None:
            break
        i, growth = best
        widths[i] = growth.widths
        slack -= growth.cost
    tolerance = config.target_tolerance * target_params
    if config.prune_mlp and slack > tolerance:  # single channels back, layers with the most removed in this step first
        removed = [plan.current.intermediate_size - w.intermediate_size for plan, w in zip(plans, widths)]
        for i in sorted(range(len(plans)), key=lambda j: -removed[j]):
            add = min(removed[i], slack // plans[i].geometry.channel_cost)
            heads, kv, channels = widths[i].as_tuple()
            widths[i] = LayerWidths(heads, kv, channels + add)
            slack -= add * plans[i].geometry.channel_cost
    if config.prune_mlp and slack > tolerance:
        slack = _swap_attention_for_channels(plans, widths, slack, config)
    return StepResult(step.sparsity, widths, target_params - slack)


def _swap_attention_for_channels(
    plans: Sequence[LayerPlan], widths: list[LayerWidths], slack: int, config: PrunerConfig
) -> int:
    """Still short of the target by more than the tolerance: take back an attention unit removed in this step and give
    up as many channels as that overshoots the target by, its own layer's first. Returns the new slack."""
    for i, plan in enumerate(plans):
        heads, kv, channels = widths[i].as_tuple()
        if kv < plan.current.num_key_value_heads:  # a kv group with its query heads
            wider = LayerWidths(heads + heads // kv, kv + 1, channels)
        elif heads < plan.current.num_attention_heads:  # one query head in every kv group
            wider = LayerWidths(heads + kv, kv, channels)
        else:
            continue
        over = plan.geometry.attention_params(wider) - plan.geometry.attention_params(widths[i]) - slack
        trial = [*widths[:i], wider, *widths[i + 1 :]]
        if over <= 0:  # it fits after all (the plan offered no attention back)
            widths[:] = trial
            return -over
        for j in [i, *(j for j in range(len(plans)) if j != i)]:
            cost = plans[j].geometry.channel_cost
            h, k, c = trial[j].as_tuple()
            drop = min(-(-over // cost), c - min(config.min_intermediate_size, c))  # rounded up: stay at or below
            trial[j] = LayerWidths(h, k, c - drop)
            over -= drop * cost
            if over <= 0:
                widths[:] = trial
                return -over
    return slack


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (ties go to the lower index)."""
    if keep >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:keep]).values


def select_heads(scores: GroupScores, target: LayerWidths) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept (query head, kv head) indices. Query head `h` belongs to kv head `h // group`, as `repeat_kv` expects."""
    heads, kv = scores.q_heads.numel(), scores.kv_heads.numel()
    group, device = heads // kv, scores.q_heads.device
    if target.num_key_value_heads < kv:  # kv_group: a kv head goes together with its query heads
        keep_kv = select_top(kv_group_scores(scores), target.num_key_value_heads)
        keep_q = (keep_kv[:, None] * group + torch.arange(group, device=device)[None, :]).flatten()
        return keep_q, keep_kv
    per_group = target.num_attention_heads // kv
    if per_group < group:  # query_head: the best `per_group` query heads of every kv group
        within = [select_top(scores.q_heads.view(kv, group)[j], per_group) + j * group for j in range(kv)]
        return torch.cat(within), torch.arange(kv, device=device)
    return torch.arange(heads, device=device), torch.arange(kv, device=device)


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
