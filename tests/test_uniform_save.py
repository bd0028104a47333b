"""A model whose layers share their widths saves as its own architecture: no auto_map, no code files, loads anywhere
without remote code."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_adapt_pruner import (
    PrunerConfig,
    export_gguf,
    load_pruned,
    prune_model,
    pruning_history,
    save_pruned,
)
from hf_adapt_pruner.history import HISTORY_FILE
from hf_adapt_pruner.layout import PrunedLayout
from hf_adapt_pruner.plain import plain_form_refusal
from hf_adapt_pruner.remote_code import mark_pruned

from test_serialization import load_in_fresh_process, logits
from tiny_models import BPE_VOCAB, MODEL_TYPES, bpe_tokenizer, calibration_blocks, tiny_model, tiny_tokenizer


def uniform_model(model_type: str, ratio: float = 0.45, **overrides):
    model = tiny_model(model_type, gqa_ratio=1, **overrides)  # 6 kv groups: heads go at this ratio
    config = PrunerConfig(target_ratio=ratio, layout="uniform", inner_steps=2, calibration_samples=8, round_to=1)
    prune_model(model, config, calibration_blocks(), progress=False)
    return model


# one fresh process each (~6 s): llama in the quick suite, every other architecture in the slow set
@pytest.mark.parametrize(
    "model_type", [t if t == "llama" else pytest.param(t, marks=pytest.mark.slow) for t in MODEL_TYPES]
)
def test_uniform_model_loads_as_its_stock_architecture_in_a_fresh_process(model_type, tmp_path):
    model = uniform_model(model_type)
    layout = model.config.pruned_layout
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    heads, kv, channels = (layout[key][0] for key in keys)
    assert heads < 6  # fewer heads than the original, not only channels
    expected = logits(model)
    folder = save_pruned(model, tmp_path / "m", tiny_tokenizer(), pruner_config=PrunerConfig(target_ratio=0.45))
    assert not list(folder.glob("*.py"))  # no configuration_/modeling_ files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config
    assert config["architectures"] == [type(tiny_model(model_type, layers=1)).__name__]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
        heads, kv, channels)  # fmt: skip
    assert config["head_dim"] == (12 if model_type.startswith("gemma") else 8)  # explicit
    assert (folder / HISTORY_FILE).is_file()

    fresh = load_in_fresh_process(folder, plain=True)  # trust_remote_code=False, without hf_adapt_pruner
    assert fresh["class"].startswith("transformers.models.")
    assert (torch.tensor(fresh["logits"]) - expected).abs().max() <= 1e-6
    assert fresh["generated_shape"] == [2, 13]
    assert fresh["pipeline_text"].startswith("w5 w6 w7")
    loaded = load_pruned(folder, attn_implementation="eager")  # the package loads it too, with its history
    assert type(loaded).__module__.startswith("transformers.models.")
    assert torch.equal(logits(loaded), expected) and pruning_history(loaded) == pruning_history(model)


def test_the_card_says_it_needs_no_remote_code(tmp_path):
    folder = save_pruned(uniform_model("llama"), tmp_path / "m", repo_id="me/uniform")
    card = (folder / "README.md").read_text()
    assert "custom_code" not in card.split("---")[1] and "trust_remote_code" not in card
    assert 'AutoModelForCausalLM.from_pretrained("me/uniform")' in card and "No remote code" in card


def test_a_remote_code_model_with_equal_widths_takes_the_plain_path(tmp_path):
    """As an adaptive run that ended with equal widths, or a folder saved in the remote-code form before this."""
    model = uniform_model("mistral")
    mark_pruned(model)
    old_form = tmp_path / "old"
    model.save_pretrained(old_form)
    assert json.loads((old_form / "config.json").read_text())["model_type"] == "adapt_pruned_mistral"
    loaded = load_pruned(old_form, attn_implementation="eager")
    folder = save_pruned(loaded, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral" and "auto_map" not in config and not list(folder.glob("*.py"))
    plain = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert type(plain).__name__ == "MistralForCausalLM"
    assert torch.equal(logits(plain), logits(model))


def test_a_later_adaptive_event_turns_a_uniform_model_back_to_remote_code(tmp_path):
    model = uniform_model("llama", ratio=0.7)
    assert type(model).__name__ == "LlamaForCausalLM"
    prune_model(model, PrunerConfig(target_ratio=0.5, amplitude=0.3, inner_steps=2, round_to=1), calibration_blocks(),
                progress=False)  # fmt: skip
    assert len(set(model.config.pruned_layout["intermediate_size"])) > 1
    folder = save_pruned(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "adapt_pruned_llama"
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("layout", ["uniform", "adaptive"])
def test_export_gguf_works_for_both_layouts(layout, tmp_path):
    model = tiny_model("llama", gqa_ratio=1, vocab_size=BPE_VOCAB)
    config = PrunerConfig(target_ratio=0.5, layout=layout, amplitude=0.3 if layout == "adaptive" else 0.02,
                          inner_steps=2, calibration_samples=8, round_to=1)  # fmt: skip
    prune_model(model, config, calibration_blocks(), progress=False)
    folder = save_pruned(model, tmp_path / "m", bpe_tokenizer())
    path = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    fields = gguf.GGUFReader(str(path)).fields
    heads = model.config.pruned_layout["num_attention_heads"]
    written = fields["deci.attention.head_count"].contents()
    assert written == (heads[0] if layout == "uniform" else heads)
    assert (len(set(heads)) == 1) == (layout == "uniform")


def test_equal_widths_the_stock_config_refuses_keep_the_remote_code_form():
    """LlamaConfig validates hidden_size % num_attention_heads: 5 heads of a 48-wide model stay remote code."""
    for model_type, refused in (("llama", True), ("mistral", False)):
        config = tiny_model(model_type, gqa_ratio=1, layers=2).config
        layout = PrunedLayout(head_dim=8, num_attention_heads=[5, 5], num_key_value_heads=[5, 5],
                              intermediate_size=[40, 40], base={"num_attention_heads": 6})  # fmt: skip
        reason = plain_form_refusal(config, layout)
        assert (reason is not None) == refused
        if refused:
            assert "not a multiple of the number of attention heads (5)" in reason
    layout.intermediate_size = [40, 48]
    assert plain_form_refusal(config, layout) == "its layers have different widths"
