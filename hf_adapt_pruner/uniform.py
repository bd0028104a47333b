"""`PrunerConfig(layout="uniform")`: every decoder layer keeps the same number of query heads, key/value heads and
MLP channels, so the pruned model is a stock model of its architecture (`hf_adapt_pruner.plain`).

Pure functions on small inputs: no model, no Trainer.

The common widths come from the scores summed over layers. Keeping `a` attention units (kv groups, or query heads per
kv group) and `c` MLP channels in every layer costs, as first-order estimated loss, the summed scores of the units
each layer drops: its own lowest-scored ones. At each inner step the engine aims at a parameter count on the line
from the event's start to its target (the last step at the target itself); for every `a` the most channels that fit
under that count are computed, and of these pairs the one with the least estimated loss is taken. Each layer then
removes its own lowest-scored units to reach the common widths.

As the adaptive `ScorePlan` does, and for the same reason (first-order scores are reliable for small changes, and a
kv group in every layer is a large one), attention is not cut deeper than the model's sparsity at the step target,
and the MLP not past halfway from it to 1; the limits give way only when no pair within them fits. With
`allocation="proportional"` the attention keeps `round(keep * units)` and the MLP takes the rest.

A worked example: SmolLM2-135M (30 layers, 3 kv groups of 3 query heads, 1536 channels; a kv group with its query
heads holds 294,912 parameters per layer, a channel 1,728) at `target_ratio=0.7` must lose 40.4 M of its 106.2 M
prunable parameters (sparsity 0.38). Keeping all 3 kv groups needs 1536 - 779 = 757 channels per layer; keeping 2
needs 928: the pair with the lower summed scores of what goes wins, and the attention limit (floor(0.38 * 3) = 1
group at most) allows both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.utils import logging

from .allocation import StepResult, model_params
from .config import PrunerConfig
from .importance import GroupScores
from .layout import LayerWidths
from .plans import LayerGeometry, kv_group_scores, min_widths


logger = logging.get_logger(__name__)


def check_uniform_start(current: Sequence[LayerWidths], config: PrunerConfig) -> None:
    """Refuse what a uniform layout cannot continue from, before any weight changes."""
    distinct = sorted({w.as_tuple() for w in current})
    if len(distinct) > 1:
        raise ValueError(
            f"layout='uniform' keeps every layer at the same widths, but this model's layers already differ "
            f"((heads, kv heads, channels) {distinct[0]} ... {distinct[-1]}: it was pruned with layout='adaptive'). "
            "Start from the unpruned model, or continue with layout='adaptive'."
        )


def expressible_units(model_config, current: LayerWidths, head_dim: int, config: PrunerConfig) -> list[int]:
    """The attention unit counts (at most the current) whose head counts the stock config accepts
    (`plain.stock_config_refusal`); the others are never chosen, and a warning names them."""
    from .plain import stock_config_refusal

    units = _attention_units(current, config)
    allowed, refused = [], []
    for a in range(units, 0, -1):
        widths = _widths(current, a, current.intermediate_size, config)
        reason = stock_config_refusal(model_config, widths, head_dim)
        (refused if reason else allowed).append((a, widths.num_attention_heads, reason))
    if refused and config.prune_attention:
        logger.warning(
            f"layout='uniform': the stock {model_config.model_type!r} config does not accept "
            f"{', '.join(str(heads) for _, heads, _ in refused)} query heads ({refused[0][2]}); attention keeps "
            f"{', '.join(str(heads) for _, heads, _ in allowed)} heads per layer only."
        )
    return [a for a, _, _ in allowed]


def _attention_units(widths: LayerWidths, config: PrunerConfig) -> int:
    """Kv groups (`attention_unit="kv_group"`) or query heads per kv group (`"query_head"`) of a layer."""
    if config.attention_unit == "kv_group":
        return widths.num_key_value_heads
    return widths.num_attention_heads // widths.num_key_value_heads


def _widths(current: LayerWidths, units: int, channels: int, config: PrunerConfig) -> LayerWidths:
    """`current` with `units` attention units and `channels` channels kept."""
    heads, kv, _ = current.as_tuple()
    if config.attention_unit == "kv_group":
        return LayerWidths(units * (heads // kv), units, channels)
    return LayerWidths(units * kv, kv, channels)


def _dropped_sums(scores: torch.Tensor) -> torch.Tensor:
    """(L, n + 1): entry [l, k] is the sum of layer l's k lowest scores (what it loses keeping the n - k best)."""
    ascending = torch.sort(scores.double(), dim=-1).values
    return torch.cat([torch.zeros(len(scores), 1, dtype=torch.float64), ascending.cumsum(-1)], dim=-1)


def estimated_losses(
    scores: Sequence[GroupScores], current: LayerWidths, config: PrunerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention loss by units kept, channel loss by channels kept), summed over layers: what the layers' own
    lowest-scored units that go would cost."""
    if config.attention_unit == "kv_group":
        dropped = _dropped_sums(torch.stack([kv_group_scores(s) for s in scores]))  # (L, kv + 1)
    else:  # the r-th weakest query head of every kv group goes together
        kv = current.num_key_value_heads
        per_rank = torch.stack([torch.sort(s.q_heads.double().view(kv, -1), dim=-1).values.sum(0) for s in scores])
        dropped = torch.cat([torch.zeros(len(scores), 1, dtype=torch.float64), per_rank.cumsum(-1)], dim=-1)
    attention = dropped.sum(0).flip(0)  # [a] = loss keeping a units
    channels = _dropped_sums(torch.stack([s.channels for s in scores])).sum(0).flip(0)  # [c] = loss keeping c
    return attention, channels


def _fitting_channels(
    geometries: Sequence[LayerGeometry], widths: LayerWidths, room: int, floor: int, config: PrunerConfig
) -> int | None:
    """The most channels (at most `widths`') every layer can keep with `room` parameters for the layers; None if
    fewer than `floor` would fit. A multiple of `round_to` when that stays within the tolerance."""
    attention = sum(g.attention_params(widths) for g in geometries)
    cost = sum(g.channel_cost for g in geometries)
    channels = min(widths.intermediate_size, (room - attention) // cost)
    if channels < floor:
        return None
    rounded = channels // config.round_to * config.round_to
    if rounded >= floor and (channels - rounded) * cost <= config.target_tolerance * room:
        return rounded
    return channels


def uniform_step(
    geometries: Sequence[LayerGeometry],
    current: Sequence[LayerWidths],
    scores: Sequence[GroupScores],
    params: int,
    target_params: int,
    steps_left: int,
    fixed_params: int,
    config: PrunerConfig,
    allowed_units: Sequence[int] | None = None,
) -> StepResult:
    """One inner step: the common widths (least estimated loss) whose count is at most this step's aim, a point
    `1 / steps_left` of the way from `params` to `target_params`. `allowed_units`: the attention unit counts that
    may be chosen (default: all; `expressible_units`)."""
    aim = target_params if steps_left <= 1 else params - (params - target_params) // steps_left
    now = current[0]
    floor = min_widths(geometries[0], now, config)
    prunable_base = sum(g.prunable_base(config) for g in geometries)
    sparsity = min(max(1.0 - (aim - fixed_params) / prunable_base, 0.0), 1.0)  # of the prunable parameters
    base_units = _attention_units(geometries[0].base, config)
    units_now, units_floor = _attention_units(now, config), _attention_units(floor, config)
    channel_floor = floor.intermediate_size if config.prune_mlp else now.intermediate_size
    attention_loss, channel_loss = estimated_losses(scores, now, config)
    candidates = []  # (units, channels)
    for units in range(units_now, (units_floor if config.prune_attention else units_now) - 1, -1):
        if allowed_units is not None and units != units_now and units not in allowed_units:
            continue
        widths = _widths(now, units, now.intermediate_size, config)
        channels = _fitting_channels(geometries, widths, aim - fixed_params, channel_floor, config)
        if channels is not None:
            candidates.append((units, channels))
    if not candidates:  # the floors bind: the narrowest layer allowed (the target check reported reachability)
        narrowest = [u for u in range(units_floor, units_now + 1) if allowed_units is None or u in allowed_units]
        candidates = [(narrowest[0] if config.prune_attention and narrowest else units_now, channel_floor)]
    units, channels = _choose(candidates, attention_loss, channel_loss, sparsity, base_units, units_now, geometries,
                              config)  # fmt: skip
    widths = [_widths(now, units, channels, config)] * len(current)
    count = model_params(geometries, widths, fixed_params)
    reached = 1.0 - (count - fixed_params) / prunable_base
    return StepResult(torch.full((len(current),), reached, dtype=torch.float64), widths, count)


def _choose(candidates, attention_loss, channel_loss, sparsity, base_units, units_now, geometries, config):
    """The candidate with the least estimated loss within the limits (attention no deeper than `sparsity`, the MLP
    not past halfway from it to 1), relaxed in that order of need when none is within them."""
    if config.allocation == "proportional":
        wanted = max(round((1.0 - sparsity) * base_units), 0)
        return min(candidates, key=lambda uc: (abs(uc[0] - wanted), -uc[1]))
    base_channels = geometries[0].base.intermediate_size
    max_gone = math.floor(sparsity * base_units + 1e-9) - (base_units - units_now)  # attention units that may go
    mlp_line = base_channels - math.floor((1.0 + sparsity) / 2 * base_channels)
    within_attention = [uc for uc in candidates if units_now - uc[0] <= max(max_gone, 0)] or candidates
    within_both = [uc for uc in within_attention if uc[1] >= mlp_line] or within_attention
    return min(within_both, key=lambda uc: (float(attention_loss[uc[0]] + channel_loss[uc[1]]), -uc[1]))
