"""PrunerConfig validation and round trips; the architecture table; the stored layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_adapt_pruner import (
    ArchitectureSpec,
    PrunedLayout,
    PrunerConfig,
    get_architecture,
    prune_model,
    register_architecture,
    supported_model_types,
)


BAD_CONFIGS = [
    ({}, "target_ratio"),
    ({"target_ratio": 0.5, "target_params": 10}, "target_ratio"),
    ({"target_ratio": 0.0}, "target_ratio"),
    ({"target_ratio": 1.5}, "target_ratio"),
    ({"target_params": -3}, "target_params"),
    ({"target_ratio": 0.7, "layer_importance": "cos"}, "layer_importance"),
    ({"target_ratio": 0.7, "group_importance": "hessian"}, "group_importance"),
    ({"target_ratio": 0.7, "amplitude": -0.1}, "amplitude"),
    ({"target_ratio": 0.7, "attention_unit": "head"}, "attention_unit"),
    ({"target_ratio": 0.7, "allocation": "greedy"}, "allocation"),
    ({"target_ratio": 0.7, "rescore_every": 0}, "rescore_every"),
    ({"target_ratio": 0.7, "inner_steps": 0}, "inner_steps"),
    ({"target_ratio": 0.7, "round_to": 0}, "round_to"),
    ({"target_ratio": 0.7, "min_kv_heads": 0}, "min_kv_heads"),
    ({"target_ratio": 0.7, "calibration_batch_size": 2.5}, "calibration_batch_size"),
    ({"target_ratio": 0.7, "max_layer_sparsity": 1.0}, "max_layer_sparsity"),
    ({"target_ratio": 0.7, "prune_attention": False, "prune_mlp": False}, "prune_attention"),
    ({"target_ratio": 0.7, "target_tolerance": 0.0}, "target_tolerance"),
    ({"target_ratio": 0.7, "data_split": "cubic"}, "data_split"),
    ({"target_ratio": 0.7, "recovery_fraction": 1.0}, "recovery_fraction"),
    ({"target_ratio": 0.7, "num_stages": 0}, "num_stages"),
    ({"target_ratio": 0.7, "importance_source": "hooks"}, "importance_source"),
]


@pytest.mark.parametrize(("kwargs", "field_name"), BAD_CONFIGS)
def test_bad_config_names_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        PrunerConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = PrunerConfig(target_params=1234, amplitude=0.05, layer_importance="manhattan", round_to=16)
    config.save_pretrained(tmp_path)
    loaded = PrunerConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert json.loads(config.to_json_string())["round_to"] == 16


def test_unknown_keys_warn(caplog):
    logger = logging.getLogger("hf_adapt_pruner")
    logger.propagate = True
    with caplog.at_level(logging.WARNING):
        config = PrunerConfig.from_dict({"target_ratio": 0.5, "not_a_field": 1})
    assert config.target_ratio == 0.5
    assert "not_a_field" in caplog.text


def test_every_field_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(PrunerConfig))


def test_unsupported_model_type_names_supported_and_how_to_register():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError) as error:
        prune_model(model, PrunerConfig(target_ratio=0.5), torch.zeros(2, 4, dtype=torch.long))
    message = str(error.value)
    assert "'gpt2'" in message and "register_architecture" in message
    assert all(t in message for t in supported_model_types())


def test_register_architecture_refuses_silent_overwrite():
    with pytest.raises(ValueError, match="overwrite=True"):
        register_architecture(ArchitectureSpec(model_type="llama"))
    assert get_architecture("llama").q_proj == "q_proj"


def test_layout_validation_names_the_key():
    good = PrunedLayout(8, [6, 3], [2, 1], [96, 40]).to_dict()
    assert PrunedLayout.from_dict(good, num_layers=2).intermediate_size == [96, 40]
    with pytest.raises(ValueError, match="layers"):
        PrunedLayout.from_dict(good, num_layers=3)
    with pytest.raises(ValueError, match="intermediate_size"):
        PrunedLayout.from_dict({**good, "intermediate_size": [96, "x"]})
    with pytest.raises(ValueError, match="multiple"):
        PrunedLayout.from_dict({**good, "num_attention_heads": [6, 4], "num_key_value_heads": [2, 3]})
    with pytest.raises(ValueError, match="JSON object"):
        PrunedLayout.from_dict("broken")
