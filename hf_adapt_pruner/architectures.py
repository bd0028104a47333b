"""The only module that knows module names: a table of supported architectures keyed by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the prunable pieces of a Llama-like decoder live, as attribute paths.

    Args:
        model_type: `config.model_type` this entry serves.
        layers: path from the `*ForCausalLM` model to the `nn.ModuleList` of decoder layers.
        attention, mlp: names of the attention and MLP sub-modules inside a decoder layer.
        q_proj, k_proj, v_proj, o_proj: linear projections inside the attention module.
        gate_proj, up_proj, down_proj: linear projections inside the MLP.
    """

    model_type: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Add a Llama-like `model_type` to the table (separate q/k/v/o and gate/up/down `nn.Linear` projections,
    heads of `config.head_dim` laid out consecutively in the projection rows)."""
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace its entry."
        )
    _REGISTRY[spec.model_type] = spec


for _model_type in ("llama", "mistral", "qwen2", "qwen3"):
    register_architecture(ArchitectureSpec(model_type=_model_type))


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(model_type: str) -> ArchitectureSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported by hf_adapt_pruner. Supported: "
            f"{', '.join(supported_model_types())}. A Llama-like model can be added with "
            "hf_adapt_pruner.register_architecture(ArchitectureSpec(model_type=..., ...)) "
            "(the table lives in hf_adapt_pruner/architectures.py)."
        ) from None


@dataclass
class LayerModules:
    """The live modules of one decoder layer that pruning touches."""

    index: int
    layer: nn.Module
    attention: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    mlp: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    try:
        return model.get_submodule(spec.layers)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at {spec.layers!r}, as the {spec.model_type!r} entry of "
            "the architecture table expects. Pass the *ForCausalLM model (not the base model or a wrapper)."
        ) from None


def layer_modules(model: nn.Module, spec: ArchitectureSpec) -> list[LayerModules]:
    """Resolve every decoder layer's prunable modules, checking they are plain `nn.Linear`."""
    result = []
    for index, layer in enumerate(decoder_layers(model, spec)):
        attention = layer.get_submodule(spec.attention)
        mlp = layer.get_submodule(spec.mlp)
        linears = {}
        for owner, owner_name, names in (
            (attention, spec.attention, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, spec.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                path = getattr(spec, name)
                module = owner.get_submodule(path)
                if type(module) is not nn.Linear:
                    raise TypeError(
                        f"layer {index}: {owner_name}.{path} is a {type(module).__name__}, not a plain nn.Linear. "
                        "Prune the dense model first (load without quantization, or call model.dequantize()) and "
                        "add adapters or quantize afterwards."
                    )
                linears[name] = module
        result.append(LayerModules(index=index, layer=layer, attention=attention, mlp=mlp, **linears))
    return result
