"""Surgery: slice decoder layers in place, keeping the same `nn.Parameter` objects.

A parameter's `.data` is replaced by the kept slice, so an optimizer that holds the parameter keeps training it;
its state tensors shaped like the parameter (Adam's `exp_avg`, `exp_avg_sq`, ...) are sliced with the same indices.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import LayerModules
from .modeling.modeling_adapt_pruner import set_attention_head_counts


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


def slice_linear_(
    linear: nn.Linear, dim: int, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Keep output rows (`dim=0`, bias too) or input columns (`dim=1`) of a linear layer."""
    slice_parameter_(linear.weight, dim, index, optimizer)
    if dim == 0:
        if linear.bias is not None:
            slice_parameter_(linear.bias, 0, index, optimizer)
        linear.out_features = linear.weight.shape[0]
    else:
        linear.in_features = linear.weight.shape[1]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: head `h` owns rows `h * head_dim ... (h + 1) * head_dim - 1`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def prune_attention_heads_(
    modules: LayerModules,
    head_dim: int,
    keep_q: torch.Tensor,
    keep_kv: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Keep query heads `keep_q` and kv heads `keep_kv` of one layer.

    Query head `h` reads kv head `h // group` (the order `repeat_kv` uses), so the kept query heads must split
    evenly over the kept kv heads and only read kept ones.
    """
    heads = modules.q_proj.out_features // head_dim
    kv_heads = modules.k_proj.out_features // head_dim
    keep_q = _check_index(keep_q, heads, f"layer {modules.index} query heads")
    keep_kv = _check_index(keep_kv, kv_heads, f"layer {modules.index} kv heads")
    group = heads // kv_heads
    owners = keep_q // group
    if len(keep_q) % len(keep_kv) or not torch.equal(owners, keep_kv.repeat_interleave(len(keep_q) // len(keep_kv))):
        raise ValueError(
            f"layer {modules.index}: kept query heads {keep_q.tolist()} do not split evenly over the kept kv heads "
            f"{keep_kv.tolist()} (query head h reads kv head h // {group})."
        )
    q_rows, kv_rows = head_rows(keep_q, head_dim), head_rows(keep_kv, head_dim)
    slice_linear_(modules.q_proj, 0, q_rows, optimizer)
    slice_linear_(modules.k_proj, 0, kv_rows, optimizer)
    slice_linear_(modules.v_proj, 0, kv_rows, optimizer)
    slice_linear_(modules.o_proj, 1, q_rows, optimizer)
    set_attention_head_counts(modules.attention, len(keep_q), len(keep_kv))


def prune_mlp_channels_(
    modules: LayerModules, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Keep MLP channels `keep`: rows of gate_proj and up_proj, columns of down_proj."""
    keep = _check_index(keep, modules.gate_proj.out_features, f"layer {modules.index} MLP channels")
    slice_linear_(modules.gate_proj, 0, keep, optimizer)
    slice_linear_(modules.up_proj, 0, keep, optimizer)
    slice_linear_(modules.down_proj, 1, keep, optimizer)
    if hasattr(modules.mlp, "intermediate_size"):
        modules.mlp.intermediate_size = len(keep)


def prune_layer_(
    modules: LayerModules,
    head_dim: int,
    keep_q: torch.Tensor,
    keep_kv: torch.Tensor,
    keep_channels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Keep the given heads and channels of one decoder layer (indices relative to its current widths)."""
    prune_attention_heads_(modules, head_dim, keep_q, keep_kv, optimizer)
    prune_mlp_channels_(modules, keep_channels, optimizer)
