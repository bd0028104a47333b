"""PrunerConfig(layout="uniform"): the same widths in every layer, chosen from the scores summed over layers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_adapt_pruner import (
    AdaptivePruner,
    AdaptPrunerCallback,
    DistillationConfig,
    PrunerConfig,
    StaticScorer,
    count_parameters,
    load_pruned,
    prune_model,
    pruning_history,
    save_pruned,
)
from hf_adapt_pruner.cli import main
from hf_adapt_pruner.importance import GroupScores
from hf_adapt_pruner.layout import LayerWidths
from hf_adapt_pruner.uniform import estimated_losses, uniform_step

from test_serialization import logits
from tiny_models import calibration_blocks, pruned_tiny_model, tiny_model


SETTINGS = dict(layout="uniform", inner_steps=3, calibration_samples=8, round_to=1)


def widths(model) -> set[tuple[int, int, int]]:
    layout = model.config.pruned_layout
    return set(zip(layout["num_attention_heads"], layout["num_key_value_heads"], layout["intermediate_size"]))


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
@pytest.mark.parametrize("ratio", [0.7, 0.4])
def test_every_layer_keeps_the_same_widths_and_the_target_is_met(unit, ratio):
    model = tiny_model("llama", gqa_ratio=2, layers=4)
    base = count_parameters(model)
    report = prune_model(model, PrunerConfig(target_ratio=ratio, attention_unit=unit, **SETTINGS),
                         calibration_blocks(), progress=False)  # fmt: skip
    assert len(widths(model)) == 1
    target = round(ratio * base)
    assert report.params_after == count_parameters(model) <= target
    # the finest uniform step is one channel in every layer: 4 layers x 3 x 48 parameters
    assert target - report.params_after <= max(0.005 * target, 4 * 3 * 48)
    heads, kv, _ = widths(model).pop()
    assert heads % kv == 0 and (kv == 3 if unit == "query_head" else heads == 2 * kv)
    assert type(model).__name__ == "LlamaForCausalLM" and "auto_map" not in model.config.to_dict()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv)


def _static_scores(layers: int, attention: float, seed: int = 0) -> list[GroupScores]:
    """Random channel scores per layer; attention scores scaled by `attention` (cheap or dear to remove)."""
    generator = torch.Generator().manual_seed(seed)
    return [GroupScores(attention * (1 + torch.rand(6, generator=generator)),
                        attention * (1 + torch.rand(2, generator=generator)),
                        torch.rand(96, generator=generator)) for _ in range(layers)]  # fmt: skip


@pytest.mark.parametrize("attention, heads_go", [(1e-6, True), (1e3, False)])
def test_the_pair_with_the_least_estimated_loss_is_taken(attention, heads_go):
    model = tiny_model("llama", gqa_ratio=3)  # 6 query heads in 2 kv groups, 96 channels
    # 35,733 parameters: the layers keep 49 % of theirs, so one of 2 kv groups may go, and with both kept the MLP
    # keeps 24 channels, within the line (96 - floor(0.755 * 96)): the estimated losses alone decide
    config = PrunerConfig(target_params=35_733, **SETTINGS)
    pruner = AdaptivePruner(model, config)
    scores = _static_scores(3, attention)
    pruner.prune_to(pruner.final_target(), StaticScorer(torch.zeros(3), [s for s in scores]), progress=False)
    _, kv, channels = widths(model).pop()
    assert (kv == 1) == heads_go  # cheap attention goes instead of channels; dear attention stays
    assert channels < 96


def test_each_layer_keeps_its_own_best_units():
    model = tiny_model("llama", gqa_ratio=3)
    pruner = AdaptivePruner(model, PrunerConfig(target_ratio=0.6, **SETTINGS))
    scores = _static_scores(3, attention=1.0, seed=3)
    pruner.prune_to(pruner.final_target(), StaticScorer(torch.zeros(3), list(scores)), progress=False)
    (event,) = pruning_history(model)
    channels = widths(model).pop()[2]
    for i, score in enumerate(scores):
        kept = event["layers"][str(i)]["channels"]  # relative to the widths before the event: the original
        assert kept == sorted(torch.topk(score.channels, channels).indices.tolist())


def test_estimated_losses_sum_each_layers_weakest_units():
    t = torch.tensor
    scores = [GroupScores(t([1.0, 2.0, 3.0, 4.0]), t([10.0, 20.0]), t([5.0, 1.0, 3.0])),
              GroupScores(t([4.0, 3.0, 2.0, 1.0]), t([0.0, 1.0]), t([2.0, 2.0, 9.0]))]  # fmt: skip
    attention, channels = estimated_losses(scores, LayerWidths(4, 2, 3), PrunerConfig(target_ratio=0.5))
    # kv groups: layer 0 (13, 27), layer 1 (7, 4); keeping 1 drops 13 and 4
    assert attention.tolist() == [13 + 27 + 7 + 4, 13 + 4, 0]
    assert channels.tolist() == [9 + 13, (1 + 3) + (2 + 2), 1 + 2, 0]  # [c] = loss keeping c channels


def test_what_uniform_cannot_do_is_refused_with_the_fix():
    adaptive = pruned_tiny_model("llama", ratio=0.7)  # its layers differ
    assert len(widths(adaptive)) > 1
    with pytest.raises(ValueError, match=r"already differ.*layout='adaptive'"):
        prune_model(adaptive, PrunerConfig(target_ratio=0.5, **SETTINGS), calibration_blocks(), progress=False)
    with pytest.raises(ValueError, match="layout='square' is not supported: choose one of adaptive, uniform"):
        PrunerConfig(target_ratio=0.5, layout="square")


@pytest.mark.parametrize("model_type, allowed_heads", [("llama", [6, 4, 3, 2, 1]), ("mistral", [6, 5, 4, 3, 2, 1])])
def test_only_head_counts_the_stock_config_accepts_are_chosen(model_type, allowed_heads, caplog):
    """LlamaConfig requires hidden_size % num_attention_heads == 0 (hidden 48: not 5 heads); MistralConfig does not."""
    model = tiny_model(model_type, gqa_ratio=1)  # 6 kv groups of one query head
    config = PrunerConfig(target_ratio=0.5, allocation="proportional", **SETTINGS)
    pruner = AdaptivePruner(model, config)
    assert pruner.uniform_units == allowed_heads
    assert ("does not accept 5 query heads" in caplog.text) == (model_type == "llama")
    # at sparsity 0.2 the proportional rule wants round(0.8 * 6) = 5 heads
    params, layers = pruner.num_parameters(), [g.params(w) for g, w in zip(pruner.geometries, pruner.widths())]
    fixed = params - sum(layers)
    aim = fixed + round(0.8 * sum(g.prunable_base(config) for g in pruner.geometries))
    scores = [GroupScores(torch.rand(6), torch.rand(6), torch.rand(96)) for _ in range(3)]
    step = uniform_step(pruner.geometries, pruner.widths(), scores, params, aim, 1, fixed, config,
                        pruner.uniform_units)  # fmt: skip
    assert step.widths[0].num_attention_heads == (4 if model_type == "llama" else 5)
    assert step.num_parameters <= aim


def test_mask_mode_saves_the_stock_architecture(tmp_path):
    masked, physical = tiny_model("qwen2"), tiny_model("qwen2")
    prune_model(masked, PrunerConfig(target_ratio=0.6, mode="mask", **SETTINGS), calibration_blocks(), progress=False)
    prune_model(physical, PrunerConfig(target_ratio=0.6, **SETTINGS), calibration_blocks(), progress=False)
    folder = save_pruned(masked, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config and "pruned_mask" not in config
    loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(physical), atol=1e-5, rtol=0)


def test_peft_model_prunes_uniformly():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    prune_model(model, PrunerConfig(target_ratio=0.6, **SETTINGS), calibration_blocks(), progress=False)
    merged = model.merge_and_unload()
    assert len(widths(merged)) == 1 and type(merged).__name__ == "LlamaForCausalLM"


def test_callback_events_with_distillation_save_stock_checkpoints(tmp_path):
    model = tiny_model("llama", gqa_ratio=1).train()
    data = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=32, seq_len=16, seed=5)]
    config = PrunerConfig(target_ratio=0.5, num_stages=3, importance_window=2, min_intermediate_size=1,
                          **{**SETTINGS, "inner_steps": 2})  # fmt: skip
    callback = AdaptPrunerCallback(config, distillation=DistillationConfig(alpha=0.5, temperature=2.0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=24, save_steps=12, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, save_only_model=True, disable_tqdm=True,
                             learning_rate=1e-3)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert len(callback.reports) == 3
    for stage, report in zip(callback.schedule, callback.reports):
        assert len({(w.num_attention_heads, w.num_key_value_heads, w.intermediate_size)
                    for w in (layer.after for layer in report.layers)}) == 1  # fmt: skip
        assert 0 <= stage.target_params - report.params_after <= max(0.005 * stage.target_params, 3 * 3 * 48)
    for step in (12, 24):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        saved = json.loads((checkpoint / "config.json").read_text())
        assert saved["model_type"] == "llama" and "auto_map" not in saved
        assert not list(checkpoint.glob("*.py"))
        plain = AutoModelForCausalLM.from_pretrained(checkpoint)  # no remote code
        assert plain.config.num_attention_heads == saved["num_attention_heads"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-24", attn_implementation="eager")
    torch.testing.assert_close(logits(final), logits(model.eval()), atol=1e-5, rtol=0)
    assert pruning_history(load_pruned(tmp_path / "run" / "checkpoint-24")) == pruning_history(model)


def test_cli_layout_flag(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    source = tmp_path / "base"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 120 + 3}" for j in range(400)))
    argv = ["prune", str(source), "--target-ratio", "0.7", "--calibration", str(text), "--output",
            str(tmp_path / "o"), "--inner-steps", "2", "--calibration-samples", "4", "--calibration-seq-len", "16",
            "--eval-blocks", "2"]  # fmt: skip
    assert main([*argv, "--layout", "square"]) == 2
    assert "layout='square' is not supported" in capsys.readouterr().err
    assert main([*argv, "--layout", "uniform"]) == 0
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" not in saved
