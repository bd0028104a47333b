"""The core engine on tiny random models of every supported model_type (GQA ratios 1 and 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_adapt_pruner import (
    AdaptivePruner,
    PrunerConfig,
    StaticScorer,
    count_parameters,
    prune_model,
    pruning_history,
)
from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.importance import GroupScores, group_scores
from hf_adapt_pruner.remote_code import base_model_type
from hf_adapt_pruner.surgery import head_rows, prune_layer_

from tiny_models import MODEL_TYPES, VOCAB, calibration_blocks, tiny_config, tiny_model


INPUT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
GQA = [1, 3]


def logits(model, input_ids=INPUT):
    with torch.no_grad():
        return model(input_ids).logits


def layers_of(model):
    return layer_modules(model, get_architecture(base_model_type(model.config.model_type)))


def input_pruned(lm, block: str):
    """The module whose input columns hold `block` (the output projection for "q", down_proj for "mlp")."""
    return next(p.module for p in lm.pruned if p.blocks == (block,) and p.dim == 1)


def removal_plan(layer_index: int, heads: int, kv_heads: int, channels: int, unit: str):
    """A fixed, non-trivial choice of what one layer keeps (query heads, kv heads, channels)."""
    group = heads // kv_heads
    if unit == "kv_group" and kv_heads > 1:
        keep_kv = torch.tensor([j for j in range(kv_heads) if j != layer_index % kv_heads])
        keep_q = head_rows(keep_kv, group)  # query heads of the kept groups
    else:  # drop one query head from every kv group
        keep_kv = torch.arange(kv_heads)
        keep_q = torch.tensor([h for h in range(heads) if h % group != (layer_index % group)] if group > 1 else
                              [h for h in range(heads) if h != layer_index % heads])  # fmt: skip
    keep_ch = torch.tensor([c for c in range(channels) if (c + layer_index) % 3 != 0])
    return keep_q, keep_kv, keep_ch


@pytest.mark.parametrize("gqa_ratio", GQA)
def test_keep_everything_is_bit_identical(model_type, gqa_ratio):
    model = tiny_model(model_type, gqa_ratio)
    before = logits(model)
    params = [id(p) for p in model.parameters()]
    d = model.config.head_dim
    for lm in layers_of(model):
        prune_layer_(lm, d, *(torch.arange(n) for n in lm.widths(d)))
    assert torch.equal(logits(model), before)
    assert [id(p) for p in model.parameters()] == params


@pytest.mark.parametrize("gqa_ratio", GQA)
@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_pruning_equals_zero_masking(model_type, gqa_ratio, unit):
    if unit == "query_head" and gqa_ratio == 1:
        pytest.skip("with one query head per kv head the two units coincide")
    if model_type == "olmo2":
        pytest.skip(
            "OLMo 2 normalises q and k over all heads together: a zeroed head still changes the others' norm, so no "
            "mask is equivalent; test_uniform_pruning_equals_the_stock_smaller_model covers it"
        )
    model = tiny_model(model_type, gqa_ratio)
    masked = copy.deepcopy(model)
    d = model.config.head_dim
    for lm, lm_masked in zip(layers_of(model), layers_of(masked)):
        heads, kv, channels = lm.widths(d)
        keep_q, keep_kv, keep_ch = removal_plan(lm.index, heads, kv, channels, unit)
        with torch.no_grad():  # a removed head / channel contributes nothing: zero its output columns
            drop_q = torch.tensor([h for h in range(heads) if h not in keep_q.tolist()])
            drop_ch = torch.tensor([c for c in range(channels) if c not in keep_ch.tolist()])
            input_pruned(lm_masked, "q").weight[:, head_rows(drop_q, d)] = 0  # o_proj
            input_pruned(lm_masked, "mlp").weight[:, drop_ch] = 0  # down_proj
        prune_layer_(lm, d, keep_q, keep_kv, keep_ch)
    assert count_parameters(model) < count_parameters(masked)
    torch.testing.assert_close(logits(model), logits(masked), atol=1e-5, rtol=0)


def test_uniform_pruning_equals_the_stock_smaller_model(model_type):
    """Slicing every layer alike gives exactly the stock model built at the smaller sizes with those weights:
    fused blocks (Phi-3), full-width q/k norms (OLMo 2), head_dim != hidden / heads (Gemma), multipliers (Granite)."""
    model = tiny_model(model_type, gqa_ratio=3)
    keep_kv, keep_q, keep_ch = torch.tensor([1]), torch.tensor([3, 4, 5]), torch.arange(0, 96, 2)
    for lm in layers_of(model):
        prune_layer_(lm, model.config.head_dim, keep_q, keep_kv, keep_ch)
    config = tiny_config(model_type, num_attention_heads=3, num_key_value_heads=1, intermediate_size=48)
    stock = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    stock.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(model), logits(stock), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gqa_ratio", GQA)
def test_prune_model_meets_target_and_keeps_gqa(model_type, gqa_ratio):
    model = tiny_model(model_type, gqa_ratio)
    config = PrunerConfig(target_ratio=0.7, inner_steps=4, calibration_samples=8, round_to=1, min_intermediate_size=1)
    report = prune_model(model, config, calibration_blocks(), progress=False)
    target = round(report.params_before * 0.7)
    assert report.params_after == count_parameters(model)
    assert abs(report.params_after - target) / target <= 0.005
    for lm in layers_of(model):
        heads, kv, _ = lm.widths(model.config.head_dim)
        assert heads % kv == 0 and heads >= 1
        assert lm.attention.num_key_value_groups == heads // kv
    layout = model.config.pruned_layout
    assert [r.after.num_attention_heads for r in report.layers] == layout["num_attention_heads"]
    assert torch.isfinite(logits(model)).all()


def test_query_head_unit_keeps_kv_heads():
    model = tiny_model("llama", gqa_ratio=3)
    config = PrunerConfig(target_ratio=0.9, attention_unit="query_head", inner_steps=3, calibration_samples=8,
                          prune_mlp=False)  # fmt: skip
    prune_model(model, config, calibration_blocks(), progress=False)
    kv = model.config.pruned_layout["num_key_value_heads"]
    assert kv == [2, 2, 2]
    assert any(h < 6 for h in model.config.pruned_layout["num_attention_heads"])


def static_scores(model, importance):
    head_dim = 8
    scores = [group_scores(lm, head_dim, "magnitude") for lm in layers_of(model)]
    return StaticScorer(torch.tensor(importance, dtype=torch.float64), scores)


def kept_fraction(model, i):
    heads, _, channels = layers_of(model)[i].widths(8)
    return (heads * 8 * 2 * 48 + channels * 3 * 48) / (6 * 8 * 2 * 48 + 96 * 3 * 48)


def test_amplitude_prunes_unimportant_layers_more():
    model = tiny_model("llama", gqa_ratio=1, layers=4)
    pruner = AdaptivePruner(model, PrunerConfig(target_ratio=0.6, amplitude=0.1, inner_steps=5, round_to=1))
    pruner.prune_to(pruner.final_target(), static_scores(model, [-1.0, -0.2, 0.3, 1.0]), progress=False)
    fractions = [kept_fraction(model, i) for i in range(4)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[3]


def test_amplitude_zero_is_uniform():
    model = tiny_model("llama", gqa_ratio=1, layers=4)
    config = PrunerConfig(target_ratio=0.6, amplitude=0.0, inner_steps=5, round_to=8, allocation="proportional")
    pruner = AdaptivePruner(model, config)
    report = pruner.prune_to(pruner.final_target(), static_scores(model, [-1.0, -0.2, 0.3, 1.0]), progress=False)
    assert len({round(layer.sparsity, 12) for layer in report.layers}) == 1
    heads = {layer.after.num_attention_heads for layer in report.layers}
    channels = [layer.after.intermediate_size for layer in report.layers]
    assert len(heads) == 1
    assert max(channels) - min(channels) <= 8  # one round_to block handed back to meet the target exactly


def test_adaptive_calibration_run_follows_measured_importance():
    model = tiny_model("qwen2", gqa_ratio=1, layers=4)
    config = PrunerConfig(target_ratio=0.6, amplitude=0.2, inner_steps=1, calibration_samples=8, round_to=1)
    report = prune_model(model, config, calibration_blocks(), progress=False)
    order = sorted(range(4), key=lambda i: report.layers[i].importance)
    assert kept_fraction(model, order[0]) < kept_fraction(model, order[-1])


def test_deterministic_under_seed():
    results = []
    for _ in range(2):
        model = tiny_model("mistral", gqa_ratio=3)
        config = PrunerConfig(
            target_ratio=0.65, inner_steps=3, calibration_samples=6, group_importance="random", seed=3
        )
        prune_model(model, config, calibration_blocks(n=24), progress=False)
        results.append((model.config.pruned_layout, logits(model)))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("metric", ["taylor", "magnitude", "random"])
def test_group_metrics_give_valid_layouts(metric):
    model = tiny_model("qwen3", gqa_ratio=3)
    config = PrunerConfig(target_ratio=0.75, group_importance=metric, inner_steps=2, calibration_samples=8)
    report = prune_model(model, config, calibration_blocks(), progress=False)
    assert report.params_after < report.params_before


def test_unreachable_target_is_refused_before_any_change():
    model = tiny_model("llama", gqa_ratio=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unreachable"):
        prune_model(model, PrunerConfig(target_params=1000, min_kv_heads=2), calibration_blocks(), progress=False)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not hasattr(model.config, "pruned_layout")


def test_target_at_the_models_size_changes_nothing(tiny_llama):  # above it: tests/test_bad_inputs.py
    before = logits(tiny_llama)
    report = prune_model(tiny_llama, PrunerConfig(target_ratio=1.0), calibration_blocks(), progress=False)
    assert report.params_after == report.params_before
    assert torch.equal(logits(tiny_llama), before)
    assert not hasattr(tiny_llama.config, "pruned_layout")  # still a stock model: save_pruned does a plain save


def test_importances_are_centred_and_scaled(tiny_llama):
    report = prune_model(tiny_llama, PrunerConfig(target_ratio=0.8, inner_steps=1, calibration_samples=4),
                         calibration_blocks(), progress=False)  # fmt: skip
    values = torch.tensor(report.layer_importance, dtype=torch.float64)  # as computed
    assert values.abs().max() == pytest.approx(1.0)
    assert values.mean() == pytest.approx(0.0, abs=1e-9)


def test_second_event_continues_from_saved_state(tiny_llama):
    config = PrunerConfig(target_ratio=0.6, inner_steps=2, calibration_samples=4, round_to=1)
    prune_model(tiny_llama, PrunerConfig(target_ratio=0.8, inner_steps=2, calibration_samples=4, round_to=1),
                calibration_blocks(), progress=False)  # fmt: skip
    base = tiny_llama.config.pruned_layout["base"]["num_parameters"]
    report = prune_model(tiny_llama, config, calibration_blocks(), progress=False)
    assert abs(report.params_after - round(0.6 * base)) / (0.6 * base) <= 0.005  # ratio of the ORIGINAL model
    assert len(pruning_history(tiny_llama)) == 2


def test_group_scores_add_and_select():
    a = GroupScores(torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([1.0, 0.0, 5.0]))
    b = (a + a).select(torch.tensor([1]), torch.tensor([0]), torch.tensor([0, 2]))
    assert b.q_heads.tolist() == [4.0] and b.channels.tolist() == [2.0, 10.0]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_other_group_metric_inputs_do_not_need_gradients(model_type):
    model = tiny_model(model_type, gqa_ratio=3)
    with pytest.raises(RuntimeError, match="needs gradients"):
        group_scores(layers_of(model)[0], model.config.head_dim, "taylor")
    assert group_scores(layers_of(model)[0], model.config.head_dim, "magnitude").q_heads.shape == (6,)


def test_rescore_every_reuses_scores_with_removed_units_dropped(tiny_llama, monkeypatch):
    from hf_adapt_pruner.scorers import CalibrationScorer

    measured = []
    original = CalibrationScorer._measure
    monkeypatch.setattr(CalibrationScorer, "_measure", lambda self, *a: measured.append(1) or original(self, *a))
    config = PrunerConfig(target_ratio=0.7, inner_steps=6, rescore_every=3, calibration_samples=4)
    report = prune_model(tiny_llama, config, calibration_blocks(), progress=False)
    assert len(measured) == 2 and report.inner_steps == 6  # steps 1 and 4 measure; the others reuse
    assert abs(report.params_after - report.target_params) <= 0.005 * report.target_params
    assert torch.isfinite(logits(tiny_llama)).all()
