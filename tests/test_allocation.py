"""Allocation by estimated loss (`allocation="score"`): pure functions on hand-made scores, and target landing."""

from __future__ import annotations

import pytest
import torch

from hf_adapt_pruner import PrunerConfig, prune_model
from hf_adapt_pruner.allocation import allocation_step
from hf_adapt_pruner.importance import GroupScores
from hf_adapt_pruner.layout import LayerWidths
from hf_adapt_pruner.plans import LayerGeometry, ScorePlan, layer_plans

from tiny_models import MODEL_TYPES, calibration_blocks, tiny_model


# SmolLM2's layer shape: 9 query / 3 kv heads of 64, hidden 576, 1536 MLP channels.
SMOL = LayerGeometry(
    LayerWidths(9, 3, 1536), q_head_cost=2 * 64 * 576, kv_head_cost=2 * 64 * 576, channel_cost=3 * 576
)
KV_GROUP_COST = 3 * SMOL.q_head_cost + SMOL.kv_head_cost  # 294,912: as much as ~171 channels


def scores(kv_group: float, channel: float, heads: int = 9, kv: int = 3, channels: int = 1536) -> GroupScores:
    """Scores whose importance per parameter is `kv_group` for every kv group and `channel` for every channel,
    with a small spread so the order within each kind is fixed (unit 0 least important)."""
    spread = torch.linspace(1.0, 1.1, channels, dtype=torch.float64)
    q = torch.full((heads,), kv_group * SMOL.q_head_cost, dtype=torch.float64)
    kv_scores = torch.full((kv,), kv_group * SMOL.kv_head_cost, dtype=torch.float64)
    return GroupScores(q * torch.linspace(1.0, 1.1, heads), kv_scores, channel * SMOL.channel_cost * spread)


def config(**overrides) -> PrunerConfig:
    return PrunerConfig(target_ratio=0.7, **overrides)


def test_cheap_attention_goes_before_channels_within_the_layers_share():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=1.0, channel=10.0), config())
    # At sparsity 0.5 the layer may lose floor(0.5 * 3) = 1 kv group: it goes first, then channels.
    widths = plan.widths(0.5)
    assert (widths.num_attention_heads, widths.num_key_value_heads) == (6, 2)
    assert widths.intermediate_size < 1536 and widths.intermediate_size % 8 == 0
    # At 0.7, two of three; never deeper than the layer's sparsity, however cheap the scores make attention.
    assert plan.widths(0.7).num_key_value_heads == 1
    assert plan.widths(0.3).as_tuple()[:2] == (9, 3)


def test_attention_share_counts_units_removed_by_earlier_steps():
    current = LayerWidths(6, 2, 1536)  # one kv group already gone
    plan = ScorePlan(SMOL, current, scores(1.0, 10.0, heads=6, kv=2), config())
    assert plan.widths(0.5).num_key_value_heads == 2  # floor(0.5 * 3) = 1 is used up
    assert plan.widths(0.7).num_key_value_heads == 1


def test_cheap_channels_keep_every_kv_group():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=10.0, channel=1.0), config())
    widths = plan.widths(0.3)
    assert widths.as_tuple()[:2] == (9, 3)  # the head cliff is gone: attention stays whole
    removed = SMOL.params(SMOL.base) - SMOL.params(widths)
    assert 0 <= removed - 0.3 * SMOL.prunable_base(config()) < 8 * SMOL.channel_cost  # within one round_to block


def test_mlp_is_not_cut_past_halfway_from_the_layers_sparsity_to_one():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=10.0, channel=1.0), config())
    # At 0.5 every kv group stays: 512 channels are more than the line, 1536 - floor(0.75 * 1536) = 384.
    assert plan.widths(0.5).as_tuple() == (9, 3, 512)
    # At 0.62 keeping every kv group leaves 264 channels, under the line of 292: one kv group goes instead.
    widths = plan.widths(0.62)
    assert widths.num_key_value_heads == 2 and widths.intermediate_size >= 292
    assert SMOL.params(widths) <= 0.38 * SMOL.params(SMOL.base)
    assert SMOL.params(widths) > 0.38 * SMOL.params(SMOL.base) - 8 * SMOL.channel_cost  # no deeper than needed
    # When the attention share is used up, the budget wins over the line (1536 - floor(0.95 * 1536) = 77).
    widths = plan.widths(0.9)
    assert widths.num_key_value_heads == 1 and widths.intermediate_size < 77
    assert SMOL.params(widths) <= 0.1 * SMOL.params(SMOL.base)


def test_layer_meets_its_budget_at_every_sparsity():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=1.0, channel=1.2), config())
    for s in torch.linspace(0.0, 0.99, 100).tolist():
        widths = plan.widths(s)
        floors_bind = widths.intermediate_size == 8  # (and the attention share or the kv floor)
        assert SMOL.params(widths) <= (1 - s) * SMOL.params(SMOL.base) or floors_bind
        assert widths.num_key_value_heads >= max(1, 3 - int(s * 3)) and widths.intermediate_size >= 8


def test_query_head_unit_takes_one_head_from_every_group():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=1.0, channel=10.0), config(attention_unit="query_head"))
    widths = plan.widths(0.4)  # floor(0.4 * 3 query heads per group) = 1 from every group
    assert widths.num_key_value_heads == 3 and widths.num_attention_heads == 6


def test_grow_gives_back_the_most_valuable_unit_that_fits():
    plan = ScorePlan(SMOL, SMOL.base, scores(kv_group=1.0, channel=1.01), config())
    widths = plan.widths(0.5)
    assert widths.num_key_value_heads < 3 and widths.intermediate_size < 1536
    assert plan.grow(widths, room=8 * SMOL.channel_cost - 1) is None
    small = plan.grow(widths, room=8 * SMOL.channel_cost)
    assert small.widths.intermediate_size == widths.intermediate_size + 8 and small.cost == 8 * SMOL.channel_cost
    large = plan.grow(widths, room=KV_GROUP_COST)  # both fit: channels are worth more per parameter here
    assert large.value > 1.0 and large.widths.num_key_value_heads == widths.num_key_value_heads


def test_step_lands_on_the_target_with_mixed_units():
    geometries = [SMOL] * 4
    cfg = config()
    fixed = 28_000_000
    total = fixed + 4 * SMOL.params(SMOL.base)
    target = round(0.8 * total)
    group_scores = [scores(1.0, 1.0 + i / 10) for i in range(4)]
    importance = torch.tensor([-1.0, -0.3, 0.3, 1.0], dtype=torch.float64)
    plans = layer_plans(geometries, [SMOL.base] * 4, group_scores, importance, cfg)
    delta = (total - target) / sum(g.prunable_base(cfg) for g in geometries)
    result = allocation_step(plans, torch.zeros(4, dtype=torch.float64), importance, delta, target, fixed, cfg, True)
    assert 0 <= target - result.num_parameters <= cfg.target_tolerance * target
    assert result.num_parameters == fixed + sum(SMOL.params(w) for w in result.widths)


@pytest.mark.parametrize("allocation", ["score", "proportional"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_three_kv_head_models_land_within_tolerance(model_type, allocation):
    """6 query / 3 kv heads: whole kv groups and 8-channel blocks are coarse next to 0.5 % of the model."""
    model = tiny_model(model_type, gqa_ratio=2)
    cfg = PrunerConfig(target_ratio=0.7, allocation=allocation, inner_steps=4, calibration_samples=8)
    report = prune_model(model, cfg, calibration_blocks(), progress=False)
    assert abs(report.params_after - report.target_params) <= 0.005 * report.target_params
    assert all(layer.after.num_attention_heads % layer.after.num_key_value_heads == 0 for layer in report.layers)
