"""Modeling code of a model pruned with Adapt-Pruner (hf_adapt_pruner). Imports only torch and transformers.

The model is the stock transformers `*ForCausalLM` of `BASE_MODEL_TYPE`. After the stock constructor, every
decoder layer's projections are resized to the widths in `config.pruned_layout`, so the state-dict keys are the
stock model's (PEFT target names, evaluation and conversion tools keep working).
"""

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_adapt_pruner import BASE_MODEL_TYPE, LAYOUT_KEY, AdaptPrunedConfig


# Where the pruned tensors of a decoder layer live (from hf_adapt_pruner's architecture table). Each entry of
# "pruned" is [module path inside a decoder layer, dimension, blocks]: that dimension of the module's weight is the
# concatenation of the blocks in order, "q" (query heads) and "kv" (key/value heads) of head_dim entries per head,
# "mlp" of one entry per MLP channel. Pruned along dimension 0, the module's bias is resized with the weight.
ARCHITECTURE = {
    "layers": "model.layers",
    "attention": "self_attn",
    "mlp": "mlp",
    "pruned": [
        ["self_attn.q_proj", 0, ["q"]],
        ["self_attn.k_proj", 0, ["kv"]],
        ["self_attn.v_proj", 0, ["kv"]],
        ["self_attn.o_proj", 1, ["q"]],
        ["mlp.gate_proj", 0, ["mlp"]],
        ["mlp.up_proj", 0, ["mlp"]],
        ["mlp.down_proj", 1, ["mlp"]],
    ],
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


def block_sizes(blocks, heads: int, kv_heads: int, channels: int, head_dim: int) -> list:
    """Sizes of the blocks of one pruned dimension."""
    sizes = {"q": heads * head_dim, "kv": kv_heads * head_dim, "mlp": channels}
    return [sizes[block] for block in blocks]


def pruned_parameters(module: nn.Module, dim: int) -> list:
    """(name, dimension) of the module's tensors that a pruned `dim` of its weight resizes."""
    names = [("weight", dim)]
    if dim == 0 and isinstance(getattr(module, "bias", None), nn.Parameter):
        names.append(("bias", 0))
    return names


def sync_sizes(module: nn.Module) -> None:
    """Keep a module's size attributes in step with its weight."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


class LayerConfig:
    """The model's config as one attention module sees it: the layer's own head counts, everything else shared
    (some attention classes read the head count from `self.config`)."""

    def __init__(self, config, **overrides):
        self.__dict__["_shared"] = config
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        if name == "_shared":
            raise AttributeError(name)
        return getattr(self._shared, name)


def set_attention_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Update the run-time attributes an attention forward reads (names differ across models and versions)."""
    attention.num_key_value_groups = heads // kv_heads
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attention, name):
            setattr(attention, name, heads)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = kv_heads
    config = getattr(attention, "config", None)
    if config is not None:
        shared = config._shared if isinstance(config, LayerConfig) else config
        attention.config = LayerConfig(shared, num_attention_heads=heads, num_key_value_heads=kv_heads)


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Resize every decoder layer's pruned tensors to the layout's widths (weights are loaded afterwards)."""
    for i, layer in enumerate(model.get_submodule(ARCHITECTURE["layers"])):
        heads, kv_heads, channels = (layout[key][i] for key in PER_LAYER_KEYS)
        for path, dim, blocks in ARCHITECTURE["pruned"]:
            module = layer.get_submodule(path)
            size = sum(block_sizes(blocks, heads, kv_heads, channels, layout["head_dim"]))
            for name, param_dim in pruned_parameters(module, dim):
                param = getattr(module, name)
                shape = list(param.shape)
                shape[param_dim] = size
                empty = torch.empty(shape, device=param.device, dtype=param.dtype)
                setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
            sync_sizes(module)
        set_attention_head_counts(layer.get_submodule(ARCHITECTURE["attention"]), heads, kv_heads)
        mlp = layer.get_submodule(ARCHITECTURE["mlp"])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = channels


# The *ForCausalLM class transformers has for BASE_MODEL_TYPE (or one registered with the auto classes).
class AdaptPrunedForCausalLM(MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[BASE_MODEL_TYPE]]):
    config_class = AdaptPrunedConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layout(self, read_layout(config))
        self.post_init()
