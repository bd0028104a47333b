"""The only module that knows module names: a table of supported architectures keyed by `config.model_type`."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .modeling.modeling_adapt_pruner import pruned_parameters


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the prunable pieces of a Llama-like decoder live, as attribute paths.

    Args:
        model_type: `config.model_type` this entry serves.
        layers: path from the `*ForCausalLM` model to the `nn.ModuleList` of decoder layers.
        attention, mlp: names of the attention and MLP sub-modules inside a decoder layer.
        q_proj, k_proj, v_proj, o_proj: linear projections inside the attention module.
        qkv_proj: a fused projection whose output rows are [query heads; key heads; value heads] (Phi-3); when
            set, it replaces q_proj, k_proj and v_proj.
        gate_proj, up_proj, down_proj: linear projections inside the MLP.
        gate_up_proj: a fused projection whose output rows are [gate channels; up channels] (Phi-3); when set, it
            replaces gate_proj and up_proj.
        q_norm, k_norm: norms inside the attention module whose weight spans the whole query (key) projection
            width (OLMo 2); they are sliced with the heads. Norms over `head_dim` only (Gemma 3, Qwen 3) are shared
            by the heads and need no entry.
        notes: what sets this architecture apart, for the supported-architecture table.
    """

    model_type: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    qkv_proj: str | None = None
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "down_proj"
    notes: str = ""

    def pruned_tensors(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """(module path inside a decoder layer, pruned dimension, blocks) for every pruned module; the dimension is
        the concatenation of its blocks: "q" / "kv" (head_dim entries per query / key-value head) and "mlp" (one
        entry per channel). The order in which `ARCHITECTURE["pruned"]` lists them in the written modeling code."""
        a, m = self.attention, self.mlp
        if self.qkv_proj:
            attention = [(f"{a}.{self.qkv_proj}", 0, ("q", "kv", "kv"))]
        else:
            attention = [(f"{a}.{self.q_proj}", 0, ("q",)), (f"{a}.{self.k_proj}", 0, ("kv",)),
                         (f"{a}.{self.v_proj}", 0, ("kv",))]  # fmt: skip
        attention.append((f"{a}.{self.o_proj}", 1, ("q",)))
        for norm, block in ((self.q_norm, "q"), (self.k_norm, "kv")):
            if norm:
                attention.append((f"{a}.{norm}", 0, (block,)))
        if self.gate_up_proj:
            mlp = [(f"{m}.{self.gate_up_proj}", 0, ("mlp", "mlp"))]
        else:
            mlp = [(f"{m}.{self.gate_proj}", 0, ("mlp",)), (f"{m}.{self.up_proj}", 0, ("mlp",))]
        mlp.append((f"{m}.{self.down_proj}", 1, ("mlp",)))
        return attention + mlp

    def describe(self) -> str:
        """Notes for the supported-architecture table: the pruned structure, then `notes`."""
        parts = []
        if self.qkv_proj:
            parts.append(f"fused `{self.qkv_proj}` sliced block by block (q, k, v)")
        if self.gate_up_proj:
            parts.append(f"fused `{self.gate_up_proj}` sliced block by block (gate, up)")
        if self.q_norm or self.k_norm:
            parts.append("full-width " + " / ".join(f"`{n}`" for n in (self.q_norm, self.k_norm) if n) +
                         " sliced with the heads")  # fmt: skip
        return "; ".join([*parts, self.notes] if self.notes else parts)

    def modeling_table(self) -> dict:
        """The literal `ARCHITECTURE` written into a pruned model's modeling code."""
        pruned = [[path, dim, list(blocks)] for path, dim, blocks in self.pruned_tensors()]
        return {"layers": self.layers, "attention": self.attention, "mlp": self.mlp, "pruned": pruned}


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Add a Llama-like `model_type` to the table: a decoder of layers with an attention module (query, key/value,
    output projections, possibly fused) and a gated MLP, heads of `config.head_dim` laid out consecutively in the
    projection rows, query head `h` reading key/value head `h // (heads / kv_heads)`.

    Example:
        ```python
        from hf_adapt_pruner import ArchitectureSpec, register_architecture

        register_architecture(ArchitectureSpec(model_type="my_llama", attention="attn", mlp="ffn"))
        ```
    """
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace its entry."
        )
    _REGISTRY[spec.model_type] = spec


for _spec in (
    ArchitectureSpec("llama", notes="q/k/v/o biases (`attention_bias=True`), tied embeddings"),
    ArchitectureSpec("mistral", notes="sliding-window attention"),
    ArchitectureSpec("qwen2", notes="q/k/v biases, sliding-window layers"),
    ArchitectureSpec("qwen3", notes="per-head `q_norm` / `k_norm` over `head_dim` (shared, not sliced)"),
    ArchitectureSpec("gemma2", notes="`head_dim` != hidden / heads, logit soft-capping, `query_pre_attn_scalar`, "
                     "alternating sliding-window layers, pre/post feed-forward norms; eager attention only (stock)"),
    ArchitectureSpec("gemma3_text", notes="as Gemma 2, plus per-head q/k norms and sdpa"),
    ArchitectureSpec("phi3", qkv_proj="qkv_proj", gate_up_proj="gate_up_proj",
                     notes="each attention layer reads its own head count"),
    ArchitectureSpec("olmo2", q_norm="q_norm", k_norm="k_norm",
                     notes="pruning is not equivalent to zero-masking here (the norm spans all heads)"),
    ArchitectureSpec("granite", notes="embedding / residual / attention multipliers, logits scaling"),
):  # fmt: skip
    register_architecture(_spec)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def architecture_table() -> str:
    """The supported-architecture table of the README, in Markdown (`hf-adapt-pruner architectures`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = ["| `model_type` | stock class | notes |", "|---|---|---|"]
    for model_type in supported_model_types():
        stock = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "(registered class)")
        rows.append(f"| `{model_type}` | `{stock}` | {_REGISTRY[model_type].describe()} |")
    return "\n".join(rows) + "\n"


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
class PrunedModule:
    """One pruned module of a decoder layer: `dim` of its weight is the concatenation of `blocks`."""

    path: str
    module: nn.Module  # holds the weight (the base layer when a PEFT adapter wraps it)
    dim: int
    blocks: tuple[str, ...]
    adapter: nn.Module | None = None  # the PEFT LoRA layer around `module`, if any

    def parameters(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, dimension) pairs the pruned dimension resizes: the weight, and the bias along dim 0."""
        return [(getattr(self.module, name), dim) for name, dim in pruned_parameters(self.module, self.dim)]


@dataclass
class LayerModules:
    """The live modules of one decoder layer that pruning touches.

    In mask mode the modules keep their shapes and `live` holds the indices of the query heads, kv heads and MLP
    channels still in use (the rest are zero); the engine then sees the layer as if those were all it had.
    """

    index: int
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    pruned: list[PrunedModule]
    live: list[torch.Tensor] | None = None

    def size(self, blocks: tuple[str, ...]) -> int:
        """Current size of the first pruned dimension made of exactly `blocks`."""
        module = next(p for p in self.pruned if p.blocks == blocks)
        return module.module.weight.shape[module.dim]

    def shape_widths(self, head_dim: int) -> tuple[int, int, int]:
        """(query heads, kv heads, MLP channels) the module shapes hold."""
        heads, channels = self.size(("q",)) // head_dim, self.size(("mlp",))
        fused = next(p for p in self.pruned if "kv" in p.blocks)
        rest = fused.module.weight.shape[fused.dim] - fused.blocks.count("q") * heads * head_dim
        return heads, rest // (fused.blocks.count("kv") * head_dim), channels

    def all_units(self, head_dim: int) -> list[torch.Tensor]:
        """Indices of every query head, kv head and MLP channel the module shapes hold."""
        return [torch.arange(n) for n in self.shape_widths(head_dim)]

    def widths(self, head_dim: int) -> tuple[int, int, int]:
        """(query heads, kv heads, MLP channels) in use: the shapes, or the unmasked units in mask mode."""
        if self.live is not None:
            return tuple(len(index) for index in self.live)
        return self.shape_widths(head_dim)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a `peft.PeftModel`; any other model as it is."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "get_base_layer") and hasattr(module, "lora_A")


def detached_copy(model: nn.Module, memo: dict[int, object]) -> nn.Module:
    """`copy.deepcopy(model, memo)` without instance-level forward wrappers (accelerate's autocast, TRL's fused head,
    a distilling forward): `memo` maps `id(tensor)` to what the copy holds instead (a cast copy, or the tensor itself
    to share it)."""
    model_copy = copy.deepcopy(model, memo)
    for key in ("forward", "_original_forward"):
        model_copy.__dict__.pop(key, None)
    return model_copy


def remove_lora_layers_(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every LoRA layer PEFT injected into the transformers `model` (as `unwrap_peft` returns it) by the layer
    it wraps, after adding the active adapters' deltas to it if `merge`; `model` is then a plain transformers model."""
    for name, module in list(model.named_modules()):
        if not is_lora_layer(module):
            continue
        if merge and not module.merged and not module.disable_adapters:
            module.merge()
        elif not merge and module.merged:
            raise ValueError(
                f"{name} has its adapters merged into its weight: unmerge them first (unmerge_adapter())."
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def base_without_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside the PEFT `model` with its LoRA layers taken out, sharing every weight with
    `model` (nothing is copied and `model` is unchanged): what `model.unload()` would return."""
    base = unwrap_peft(model)
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return remove_lora_layers_(detached_copy(base, shared), merge=False)


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    try:
        return unwrap_peft(model).get_submodule(spec.layers)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at {spec.layers!r}, as the {spec.model_type!r} entry of "
            "the architecture table expects. Pass the *ForCausalLM model (not the base model or a wrapper)."
        ) from None


def _resolve(layer: nn.Module, index: int, path: str) -> tuple[nn.Module, nn.Module | None]:
    """(module holding the weight, PEFT adapter layer around it or None); refuses what cannot be sliced."""
    module = layer.get_submodule(path)
    adapter = None
    if is_lora_layer(module):
        unsupported = [n for n in ("lora_embedding_A", "lora_magnitude_vector") if getattr(module, n, None)]
        if unsupported:
            raise TypeError(f"layer {index}: {path} carries {unsupported[0]} (DoRA / embedding LoRA); only plain LoRA "
                            "adapters can be pruned with their layer. Prune first, then add the adapter.")  # fmt: skip
        adapter, module = module, module.get_base_layer()
    elif hasattr(module, "get_base_layer"):
        raise TypeError(
            f"layer {index}: {path} is a {type(module).__name__} adapter layer; only LoRA adapters can be pruned "
            "with their layer. Merge it (merge_and_unload) or prune before adding it."
        )
    weight = getattr(module, "weight", None)
    is_norm = isinstance(weight, nn.Parameter) and weight.dim() == 1  # a norm over the pruned width (OLMo 2)
    if type(module) is not nn.Linear and not is_norm:
        raise TypeError(
            f"layer {index}: {path} is a {type(module).__name__}, not a plain nn.Linear. Prune the dense model "
            "first (load without quantization, or call model.dequantize()) and add adapters or quantize afterwards."
        )
    return module, adapter


def layer_modules(model: nn.Module, spec: ArchitectureSpec) -> list[LayerModules]:
    """Resolve every decoder layer's pruned modules (through PEFT LoRA layers to the weights they wrap)."""
    result = []
    for index, layer in enumerate(decoder_layers(model, spec)):
        pruned = []
        for path, dim, blocks in spec.pruned_tensors():
            try:
                module, adapter = _resolve(layer, index, path)
            except AttributeError:
                raise ValueError(f"layer {index} has no module {path!r}, which the {spec.model_type!r} entry of the "
                                 "architecture table names.") from None  # fmt: skip
            pruned.append(PrunedModule(path, module, dim, blocks, adapter))
        attention, mlp = layer.get_submodule(spec.attention), layer.get_submodule(spec.mlp)
        result.append(LayerModules(index=index, layer=layer, attention=attention, mlp=mlp, pruned=pruned))
    return result
