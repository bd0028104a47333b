"""Surgery: slice decoder layers in place, keeping the same `nn.Parameter` objects.

A parameter's `.data` is replaced by the kept slice, so an optimizer that holds the parameter keeps training it;
its state tensors shaped like the parameter (Adam's `exp_avg`, `exp_avg_sq`, ...) are sliced with the same indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architectures import LayerModules, PrunedModule
from .modeling.modeling_adapt_pruner import pruned_parameters, set_attention_head_counts, sync_sizes
from .sharding import replicated_like


def _check_index(index: torch.Tensor, size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError(f"{what}: cannot remove every unit; keep at least one.")
    if not bool((index[1:] > index[:-1]).all()) or int(index[0]) < 0 or int(index[-1]) >= size:
        raise ValueError(f"{what}: kept indices must be strictly increasing and in [0, {size}), got {index.tolist()}.")
    return index


def slice_parameter_(
    param: nn.Parameter, dim: int, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Keep `index` along `dim` of `param`, its `.grad` and every optimizer state tensor shaped like it."""
    old_shape = param.shape
    index = index.to(param.device)
    with torch.no_grad():
        param.data = param.data.index_select(dim, index).contiguous()
        if param.grad is not None:
            param.grad = param.grad.index_select(dim, index).contiguous()
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old_shape:
                state[key] = value.index_select(dim, index.to(value.device)).contiguous()
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                raise ValueError(
                    f"Optimizer state {key!r} has shape {tuple(value.shape)}, neither a scalar nor the parameter's "
                    f"{tuple(old_shape)}: {type(optimizer).__name__} cannot be sliced. Use AdamW, Adam or SGD, or "
                    "recreate the optimizer after pruning."
                )


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: head `h` owns rows `h * head_dim ... (h + 1) * head_dim - 1`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).flatten()


def kept_entries(pruned: PrunedModule, sizes: dict[str, int], keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """Indices along the pruned dimension of `pruned` to keep, block by block (`keep` is relative to each block)."""
    parts, offset = [], 0
    for block in pruned.blocks:
        parts.append(keep[block] + offset)
        offset += sizes[block]
    return torch.cat(parts)


def slice_module_(pruned: PrunedModule, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep `index` along the pruned dimension of one module, and of the LoRA adapters around it: `lora_B` rows
    when outputs are pruned, `lora_A` columns when inputs are."""
    for module in (pruned.module, *lora_factors(pruned)):
        for name, dim in pruned_parameters(module, pruned.dim):
            slice_parameter_(getattr(module, name), dim, index, optimizer)
        sync_sizes(module)
    if pruned.adapter is not None:
        pruned.adapter.out_features, pruned.adapter.in_features = pruned.module.weight.shape


def lora_factors(pruned: PrunedModule) -> list[nn.Linear]:
    """The LoRA factors sharing the pruned dimension: every adapter's `lora_B` (outputs) or `lora_A` (inputs)."""
    if pruned.adapter is None:
        return []
    return list((pruned.adapter.lora_B if pruned.dim == 0 else pruned.adapter.lora_A).values())


def kept_per_module(modules: LayerModules, head_dim: int, plan: Sequence[torch.Tensor]) -> list:
    """(pruned module, indices to keep along its pruned dimension) for kept (query heads, kv heads, channels)."""
    heads, kv_heads, channels = modules.shape_widths(head_dim)
    sizes = {"q": heads * head_dim, "kv": kv_heads * head_dim, "mlp": channels}
    keep = {"q": head_rows(plan[0], head_dim), "kv": head_rows(plan[1], head_dim), "mlp": plan[2]}
    return [(pruned, kept_entries(pruned, sizes, keep)) for pruned in modules.pruned]


def _check_plan(layer: int, widths: tuple[int, int, int], *keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Indices checked; query head `h` reads kv head `h // group` (the order `repeat_kv` uses), so the kept query
    heads must split evenly over the kept kv heads and only read kept ones."""
    heads, kv_heads, channels = widths
    keep_q = _check_index(keep[0], heads, f"layer {layer} query heads")
    keep_kv = _check_index(keep[1], kv_heads, f"layer {layer} kv heads")
    keep_channels = _check_index(keep[2], channels, f"layer {layer} MLP channels")
    group = heads // kv_heads
    owners = keep_q // group
    if len(keep_q) % len(keep_kv) or not torch.equal(owners, keep_kv.repeat_interleave(len(keep_q) // len(keep_kv))):
        raise ValueError(
            f"layer {layer}: kept query heads {keep_q.tolist()} do not split evenly over the kept kv heads "
            f"{keep_kv.tolist()} (query head h reads kv head h // {group})."
        )
    return keep_q, keep_kv, keep_channels


def prune_layer_(
    modules: LayerModules,
    head_dim: int,
    keep_q: torch.Tensor,
    keep_kv: torch.Tensor,
    keep_channels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Keep query heads `keep_q`, kv heads `keep_kv` and MLP channels `keep_channels` of one decoder layer (indices
    relative to its current widths), in every module that holds them (fused projections block by block)."""
    plan = _check_plan(modules.index, modules.shape_widths(head_dim), keep_q, keep_kv, keep_channels)
    for pruned, kept in kept_per_module(modules, head_dim, plan):
        slice_module_(pruned, kept, optimizer)
    keep_q, keep_kv, keep_channels = plan
    set_attention_head_counts(modules.attention, len(keep_q), len(keep_kv))
    if hasattr(modules.mlp, "intermediate_size"):
        modules.mlp.intermediate_size = len(keep_channels)


def mask_layer_(
    modules: LayerModules,
    head_dim: int,
    keep_q: torch.Tensor,
    keep_kv: torch.Tensor,
    keep_channels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Mask mode: keep the given units among those in use (`modules.live`) and zero the rest; shapes stay."""
    if modules.live is None:
        modules.live = modules.all_units(head_dim)
    plan = _check_plan(modules.index, modules.widths(head_dim), keep_q, keep_kv, keep_channels)
    modules.live = [live[keep] for live, keep in zip(modules.live, plan)]
    apply_masks_(modules, head_dim, optimizer)


def apply_masks_(modules: LayerModules, head_dim: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero every weight of the masked units of one layer (adapters and optimizer state too)."""
    if modules.live is None:
        return
    for pruned, kept in kept_per_module(modules, head_dim, modules.live):
        for module in (pruned.module, *lora_factors(pruned)):
            for name, dim in pruned_parameters(module, pruned.dim):
                param = getattr(module, name)
                dropped = torch.ones(param.shape[dim], dtype=torch.bool)
                dropped[kept] = False
                dropped = replicated_like(dropped.view([-1 if d == dim else 1 for d in range(param.dim())]), param)
                tensors = [param, *(optimizer.state.get(param, {}).values() if optimizer is not None else ())]
                with torch.no_grad():
                    for tensor in tensors:
                        if isinstance(tensor, torch.Tensor) and tensor.shape == param.shape:
                            tensor.masked_fill_(dropped, 0)  # on a sharded tensor, each rank fills its shard
