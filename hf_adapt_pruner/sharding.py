"""Sharded parameters (FSDP2's `fully_shard`, or any `DTensor` parameters): what mask mode needs of them.

Shapes are global on a `DTensor` (`param.shape` is the full shape), so widths, layouts and parameter counts read the
same as on a plain model. Three things differ (scores and saving are collectives: every rank runs them, in order):
- scores: per-entry saliencies summed from local shards are gathered into full vectors (`full_tensor`);
- masks: a mask built on every rank is applied to each rank's own shard (`replicated_like`, a local operation);
- saving: the full state dict is gathered on rank 0, which loads it into a plain copy of the model (`gather_model`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # torch built without distributed support
    DTensor = Replicate = None


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def has_sharded_parameters(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a `DTensor`; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def replicated_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (the same on every rank) in a form that combines with `like` elementwise: a replicated `DTensor` on
    `like`'s mesh when `like` is sharded, so each rank uses the part that matches its shard."""
    if not is_sharded(like):
        return value.to(like.device)
    local = value.to(like.to_local().device)
    return DTensor.from_local(local, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: `fully_shard` swaps in a subclass that also derives from `FSDPModule`."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def gather_model(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) copy of a `fully_shard`-ed model on rank 0, None on the other ranks.

    Collective: every rank must call it. Rank 0 holds the full state dict on CPU and a copy of the model.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = _unsharded_class(model)(copy.deepcopy(model.config))
    plain.to(next(iter(state.values())).dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"Gathering the sharded model: the state dict does not fit a fresh {type(plain).__name__} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})."
        )
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    for name, value in model.__dict__.items():  # what the package keeps on the model (the pruning history)
        if name.startswith("_hf_adapt_pruner_"):
            plain.__dict__[name] = copy.deepcopy(value)
    return plain.eval()
