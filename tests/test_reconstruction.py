"""Least-squares reconstruction: the closed form, and that it brings pruned models closer to the unpruned ones."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_adapt_pruner import PrunerConfig, prune_model
from hf_adapt_pruner.pruner import materialize_masks
from hf_adapt_pruner.reconstruction import GramStatistics, least_squares_correction

from tiny_models import MODEL_TYPES, VOCAB, calibration_blocks, tiny_model


HELD_OUT = torch.randint(3, VOCAB, (8, 24), generator=torch.Generator().manual_seed(11))


def config(**overrides) -> PrunerConfig:
    # one inner step: the units removed are chosen before any refit, so both runs remove the same ones
    fields = dict(target_ratio=0.6, inner_steps=1, round_to=1, calibration_samples=16, calibration_batch_size=8)
    return PrunerConfig(**{**fields, **overrides})


def logit_error(model, reference) -> float:
    """Mean squared distance of `model`'s log-probabilities from `reference`'s on held-out tokens."""
    with torch.no_grad():
        got = torch.log_softmax(model(HELD_OUT).logits.float(), -1)
        want = torch.log_softmax(reference(HELD_OUT).logits.float(), -1)
    return float((got - want).pow(2).mean())


def pruned_pair(model, **overrides):
    """(pruned without reconstruction, pruned with it) from copies of `model`, on the same calibration data."""
    blocks = calibration_blocks(32, 24)
    plain, refit = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(plain, config(reconstruction="none", **overrides), blocks, progress=False)
    prune_model(refit, config(reconstruction="least_squares", **overrides), blocks, progress=False)
    return plain, refit


def test_correction_is_the_closed_form_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=g, dtype=torch.float64)
    kept, removed = torch.tensor([0, 2, 3, 5, 7, 8, 11]), torch.tensor([1, 4, 6, 9, 10])
    refit = weight[:, kept] + least_squares_correction(weight, x.T @ x, kept, removed, damping=0.0)
    # argmin_W' || X W^T - X_K W'^T ||, solved directly
    expected = torch.linalg.lstsq(x[:, kept], x @ weight.T).solution.T
    torch.testing.assert_close(refit, expected)
    residual = lambda w: float((x @ weight.T - x[:, kept] @ w.T).norm())  # noqa: E731
    assert residual(refit) < residual(weight[:, kept])


def test_damping_shrinks_the_correction_toward_none():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 8, generator=g, dtype=torch.float64)
    kept, removed = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7])
    sizes = [float(least_squares_correction(weight, x.T @ x, kept, removed, d).norm()) for d in (0.0, 1.0, 1e6)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 1e-4 * sizes[0]


def test_gram_statistics_leave_padding_out():
    model = tiny_model("llama", layers=2)
    from hf_adapt_pruner.architectures import get_architecture, layer_modules

    layers = layer_modules(model, get_architecture("llama"))
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    grams = GramStatistics(layers)
    with grams, torch.no_grad():
        grams.token_mask = mask
        model(ids, attention_mask=mask)
    assert grams.tokens == 16
    assert len(grams.grams) == 2 * len(layers)  # o_proj and down_proj of every layer


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_reconstruction_brings_every_architecture_closer_to_the_unpruned_model(model_type):
    model = tiny_model(model_type).float()
    plain, refit = pruned_pair(model)
    assert refit.config.pruned_layout["intermediate_size"] == plain.config.pruned_layout["intermediate_size"]
    assert logit_error(refit, model) < logit_error(plain, model)


def test_reconstruction_over_several_inner_steps_and_gqa():
    model = tiny_model("llama", gqa_ratio=1).float()
    plain, refit = pruned_pair(model, inner_steps=4, target_ratio=0.5)
    assert logit_error(refit, model) < logit_error(plain, model)


def test_mask_mode_makes_the_same_refit_as_physical_pruning():
    model = tiny_model("llama").float()
    physical, masked = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(physical, config(inner_steps=3), calibration_blocks(32, 24), progress=False)
    prune_model(masked, config(inner_steps=3, mode="mask"), calibration_blocks(32, 24), progress=False)
    sliced = materialize_masks(masked)
    with torch.no_grad():
        torch.testing.assert_close(sliced(HELD_OUT).logits, physical(HELD_OUT).logits, rtol=1e-4, atol=1e-4)


def test_lora_base_weights_absorb_the_adapters_removed_columns():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama").float()
    lora = peft.LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora)
    reference = copy.deepcopy(wrapped)
    plain, refit = copy.deepcopy(wrapped), copy.deepcopy(wrapped)
    prune_model(plain, config(reconstruction="none"), calibration_blocks(32, 24), progress=False)
    prune_model(refit, config(), calibration_blocks(32, 24), progress=False)
    assert logit_error(refit, reference) < logit_error(plain, reference)
    lora_b = refit.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    assert lora_b.shape[0] == model.config.hidden_size  # the adapter still reads the kept channels


def test_none_leaves_the_kept_weights_unchanged():
    model = tiny_model("llama").float()
    plain, refit = pruned_pair(model, prune_attention=False)
    original = model.model.layers[0].mlp.down_proj.weight.T  # (channels, hidden): one row per input column
    for pruned, unchanged in ((plain, True), (refit, False)):
        columns = pruned.model.layers[0].mlp.down_proj.weight.T
        distance = (
            torch.cdist(columns, original, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        )  # to the nearest original column
        assert bool((distance < 1e-6).all()) == unchanged


def test_auto_refits_in_one_shot_and_not_in_callback_events():
    default = PrunerConfig(target_ratio=0.6)
    assert default.reconstruction == "auto" and default.refits(while_training=False)
    assert not default.refits(while_training=True)
    assert PrunerConfig(target_ratio=0.6, reconstruction="least_squares").refits(while_training=True)
    model = tiny_model("llama").float()
    report = prune_model(model, config(reconstruction="auto"), calibration_blocks(32, 24), progress=False)
    assert report.reconstruction_tokens == 16 * 24  # one inner step of 16 sequences
