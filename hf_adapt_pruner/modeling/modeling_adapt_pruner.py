"""Modeling code of a model pruned with Adapt-Pruner (hf_adapt_pruner). Imports only torch and transformers.

The model is the stock transformers `*ForCausalLM` of `BASE_MODEL_TYPE`. After the stock constructor, every
decoder layer's projections are resized to the widths in `config.pruned_layout`, so the state-dict keys are the
stock model's (PEFT target names, evaluation and conversion tools keep working).
"""

import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_adapt_pruner import BASE_MODEL_TYPE, LAYOUT_KEY, AdaptPrunedConfig


# Attribute paths of the pruned modules (from hf_adapt_pruner's architecture table).
MODULES = {
    "layers": "model.layers",
    "attention": "self_attn",
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "o_proj": "o_proj",
    "mlp": "mlp",
    "gate_proj": "gate_proj",
    "up_proj": "up_proj",
    "down_proj": "down_proj",
}
PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def read_layout(config) -> dict:
    """`config.pruned_layout`, checked; errors name the key and the fix."""
    layout = getattr(config, LAYOUT_KEY, None)
    if not isinstance(layout, dict):
        raise ValueError(
            f"config.{LAYOUT_KEY} is missing or not a JSON object ({type(layout).__name__}): this folder's "
            "config.json does not describe a pruned model. Restore config.json from the original save."
        )
    num_layers = config.num_hidden_layers
    for key in PER_LAYER_KEYS:
        values = layout.get(key)
        if not (
            isinstance(values, list)
            and len(values) == num_layers
            and all(isinstance(v, int) and v > 0 for v in values)
        ):
            raise ValueError(
                f"config.{LAYOUT_KEY}.{key} must list {num_layers} positive integers (one per layer), got {values!r}."
            )
    if not isinstance(layout.get("head_dim"), int):
        raise ValueError(f"config.{LAYOUT_KEY}.head_dim must be an integer, got {layout.get('head_dim')!r}.")
    for i, (heads, kv) in enumerate(zip(layout["num_attention_heads"], layout["num_key_value_heads"])):
        if heads % kv:
            raise ValueError(
                f"config.{LAYOUT_KEY}: layer {i} has {heads} query heads, not a multiple of its {kv} kv heads."
            )
    return layout


def set_attention_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Update the run-time attributes an attention forward reads (names differ across models and versions)."""
    attention.num_key_value_groups = heads // kv_heads
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attention, name):
            setattr(attention, name, heads)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = kv_heads


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype
    )


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Resize every decoder layer's projections to the layout's widths (weights are loaded afterwards)."""
    head_dim = layout["head_dim"]
    for i, layer in enumerate(model.get_submodule(MODULES["layers"])):
        heads, kv_heads, channels = (layout[key][i] for key in PER_LAYER_KEYS)
        attention = layer.get_submodule(MODULES["attention"])
        for name, in_dim, out_dim in (
            ("q_proj", None, heads * head_dim),
            ("k_proj", None, kv_heads * head_dim),
            ("v_proj", None, kv_heads * head_dim),
            ("o_proj", heads * head_dim, None),
        ):
            linear = getattr(attention, MODULES[name])
            setattr(
                attention,
                MODULES[name],
                _resized(linear, in_dim or linear.in_features, out_dim or linear.out_features),
            )
        set_attention_head_counts(attention, heads, kv_heads)
        mlp = layer.get_submodule(MODULES["mlp"])
        for name, in_dim, out_dim in (
            ("gate_proj", None, channels),
            ("up_proj", None, channels),
            ("down_proj", channels, None),
        ):
            linear = getattr(mlp, MODULES[name])
            setattr(mlp, MODULES[name], _resized(linear, in_dim or linear.in_features, out_dim or linear.out_features))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = channels


class AdaptPrunedForCausalLM(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])):
    config_class = AdaptPrunedConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, read_layout(config))
        self.post_init()
