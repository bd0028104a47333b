"""mode="mask" in one process: the same decisions as physical pruning, kept at zero while training, sliced at save."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig, count_parameters, load_pruned, prune_model, save_pruned
from hf_adapt_pruner.pruner import AdaptivePruner, materialize_masks

from tiny_models import VOCAB, calibration_blocks, tiny_model


INPUT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
SETTINGS = dict(target_ratio=0.7, inner_steps=3, calibration_samples=8, round_to=1)


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma2"])
def test_mask_mode_makes_the_decisions_physical_pruning_makes(model_type, tmp_path):
    masked, physical = tiny_model(model_type), tiny_model(model_type)
    full_size = count_parameters(masked)
    report = prune_model(masked, PrunerConfig(**SETTINGS, mode="mask"), calibration_blocks(), progress=False)
    prune_model(physical, PrunerConfig(**SETTINGS), calibration_blocks(), progress=False)
    assert count_parameters(masked) == full_size  # shapes unchanged
    assert report.params_after == count_parameters(physical)  # the unmasked count is the pruned count
    sliced = materialize_masks(masked)
    assert sliced.config.pruned_layout["intermediate_size"] == physical.config.pruned_layout["intermediate_size"]
    torch.testing.assert_close(logits(sliced), logits(masked), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(sliced), logits(physical), atol=1e-5, rtol=0)
    save_pruned(masked, tmp_path / "saved")  # slices a copy
    torch.testing.assert_close(logits(load_pruned(tmp_path / "saved")), logits(masked), atol=1e-5, rtol=0)
    assert count_parameters(masked) == full_size and "pruned_mask" in masked.config.to_dict()


def test_mask_mode_is_refused_where_masks_are_not_equivalent():
    with pytest.raises(ValueError, match="mode='physical'"):
        AdaptivePruner(tiny_model("olmo2"), PrunerConfig(target_ratio=0.7, mode="mask"))


def test_callback_mask_mode_keeps_masked_weights_at_zero_and_resumes_from_checkpoints(tmp_path):
    model = tiny_model("qwen2").train()
    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=32, seq_len=16)]

    def run(model, resume=None):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=2,
                                 learning_rate=1e-2, save_strategy="steps", save_steps=6, report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0)  # fmt: skip
        callback = AdaptPrunerCallback(PrunerConfig(**SETTINGS, num_stages=2, importance_window=2, mode="mask"))
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train(resume_from_checkpoint=resume)
        return callback

    callback = run(model)
    pruner = callback._pruner
    assert abs(pruner.num_parameters() - callback.schedule[-1].target_params) <= 0.01 * pruner.num_parameters()
    zero_rows = (model.model.layers[0].mlp.gate_proj.weight.abs().sum(dim=1) == 0).nonzero().flatten().tolist()
    assert zero_rows == sorted(set(range(96)) - set(pruner.layers[0].live[2].tolist()))  # masked = exactly zero

    checkpoint = tmp_path / "run" / "checkpoint-6"
    resumed = run(load_pruned(checkpoint), resume=str(checkpoint))
    assert resumed._pruner.layout.intermediate_size == pruner.layout.intermediate_size
    masked = copy.deepcopy(model).eval()
    torch.testing.assert_close(logits(materialize_masks(masked)), logits(masked), atol=1e-5, rtol=0)
