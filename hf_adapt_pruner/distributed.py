"""Several processes, one model: identical prune decisions on every rank, and DDP after physical slicing.

Gradients are already averaged across ranks when the callback reads them (DDP's reducer all-reduces them during
backward, before `on_pre_optimizer_step`), but layer similarity comes from each rank's own batches and a calibration
pass runs outside DDP. So before allocation the importances are averaged across ranks, and before any weight is
touched every rank compares its chosen heads and channels with rank 0's: a difference (a non-deterministic kernel,
rank-dependent data in the scoring path) stops every rank with an error instead of letting the replicas drift apart.

`rebuild_ddp_reducer` lets a live `DistributedDataParallel` train on after its module's parameters were sliced;
`running_trainer` and `find_ddp_wrapper` find that wrapper when the user did not call `callback.attach(trainer)`.
"""

from __future__ import annotations

import gc
import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers.trainer_callback import CallbackHandler
from transformers.utils import logging

from .importance import GroupScores


logger = logging.get_logger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankSync:
    """The collectives of a prune event (every rank must call them in the same order)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = communication_device(group)

    def average(self, importance: torch.Tensor, scores: Sequence[GroupScores]) -> tuple[torch.Tensor, list]:
        """Mean of the layer importances and group scores over the ranks (float64, on CPU)."""
        parts = [importance.double().cpu()] + [t for s in scores for t in (s.q_heads, s.kv_heads, s.channels)]
        flat = torch.cat([p.double().cpu().flatten() for p in parts]).to(self.device)
        dist.all_reduce(flat, group=self.group)  # gloo and nccl both sum
        flat = flat.cpu() / self.world_size
        pieces = iter(flat.split([p.numel() for p in parts]))
        importance = next(pieces)
        return importance, [GroupScores(next(pieces), next(pieces), next(pieces)) for _ in scores]

    def check_agreement(self, what: str, plans: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Raise on every rank if any rank's plan (layer -> kept indices) differs from rank 0's."""
        device = self.device
        local = _encode(plans).to(device)
        size = torch.tensor([local.numel()], dtype=torch.long, device=device)
        dist.broadcast(size, src=0, group=self.group)
        reference = local.clone() if self.rank == 0 else torch.empty(int(size), dtype=torch.long, device=device)
        dist.broadcast(reference, src=0, group=self.group)
        differs = torch.tensor([int(not torch.equal(local, reference))], dtype=torch.long, device=device)
        flags = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(flags, differs, group=self.group)
        bad = [rank for rank, flag in enumerate(flags) if int(flag)]
        if bad:
            raise RuntimeError(
                f"{what}: rank(s) {bad} chose other heads or channels than rank 0, so the model replicas would "
                "diverge; nothing was pruned in this step. The importance scores differ between ranks: make the "
                "scoring deterministic (same calibration data on every rank, deterministic kernels) or report this "
                "as a bug in hf_adapt_pruner."
            )


def communication_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where the tensors of a collective must live: NCCL takes only CUDA tensors (the current device, as accelerate
    and the Trainer set it per rank), gloo and a `cpu:gloo,cuda:nccl` pair take CPU tensors."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(plans: dict[int, tuple[torch.Tensor, ...]]) -> torch.Tensor:
    values = []
    for layer in sorted(plans):
        values.append(layer)
        for index in plans[layer]:
            values += [len(index), *index.tolist()]
    return torch.tensor(values, dtype=torch.long)


_DDP_INTERNALS = ("reducer", "_remove_autograd_hooks", "_build_params_for_reducer",
                  "_build_debug_param_to_name_mapping", "_ddp_init_helper")  # fmt: skip


def ddp_rebuild_unsupported(ddp: nn.Module) -> str | None:
    """Why `rebuild_ddp_reducer` cannot serve this DDP object (None: it can)."""
    missing = [name for name in _DDP_INTERNALS if not hasattr(ddp, name)]
    if missing:
        return f"this torch's DistributedDataParallel lacks {', '.join(missing)}"
    if getattr(ddp, "static_graph", False):
        return "DDP runs with static_graph=True"
    if getattr(ddp, "mixed_precision", None) is not None or getattr(ddp, "_comm_hooks", None):
        return "DDP has a mixed-precision config or communication hooks"
    if getattr(ddp, "_use_python_reducer", False) or getattr(ddp, "_delay_all_reduce_params", None):
        return "DDP uses the Python reducer or delayed all-reduce"
    return None


def rebuild_ddp_reducer(ddp: nn.Module) -> None:
    """Make a live `DistributedDataParallel` train on after parameters of its module changed shape.

    The reducer keeps the parameters' gradient accumulators (which remember the old shapes) and buckets sized for
    them, so the next backward fails. Its autograd hooks and the reducer are released and a new reducer is built
    in place, over the same module and parameters, with the same DDP options; shapes are checked across ranks.
    """
    from torch.distributed.utils import _verify_param_shape_across_processes

    reason = ddp_rebuild_unsupported(ddp)
    if reason:
        raise RuntimeError(f"Cannot rebuild the DDP reducer: {reason}.")
    ddp._remove_autograd_hooks()
    ddp.reducer = None
    ddp.logger = None
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    _verify_param_shape_across_processes(ddp.process_group, parameters)
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, False)
    ddp._has_rebuilt_buckets = False


def running_trainer(callback: Any) -> Any | None:
    """The `transformers.Trainer` whose callback handler is calling `callback` right now, or None.

    Read from the call stack: the Trainer fires every event from its own methods, through the `CallbackHandler`
    that lists the callback, so both are there by construction (whatever the launcher: torchrun, accelerate, a
    notebook). Objects found elsewhere (a Trainer kept from an earlier run, another handler listing the same
    callback) cannot be mistaken for them. None when no Trainer runs the event (a custom loop that drives a
    `CallbackHandler` itself) or the Python implementation keeps no frames.
    """
    trainer_module = sys.modules.get("transformers.trainer")
    frame = inspect.currentframe()
    if trainer_module is None or frame is None:  # no Trainer was ever imported, so none is running
        return None
    trainer_class = trainer_module.Trainer
    handler = None
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if handler is None and isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
                handler = owner
            elif handler is not None and isinstance(owner, trainer_class) and owner.callback_handler is handler:
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame kept in a local would keep every caller's locals alive


def find_ddp_wrapper(model: nn.Module) -> DistributedDataParallel | None:
    """The one live `DistributedDataParallel` whose module is `model`, or None (none, or several: ambiguous).

    For events fired without a Trainer (a custom loop driving a `CallbackHandler`): one pass over the objects the
    garbage collector tracks (about 0.2 s per 500,000 objects), once per training run. `type(obj)` rather than
    `isinstance`, which would read `__class__` on every object, and some (lazy modules, deprecated aliases) run
    code or warn when touched.
    """
    found = [o for o in gc.get_objects() if issubclass(type(o), DistributedDataParallel) and o.module is model]
    return found[0] if len(found) == 1 else None


def ddp_mode(mode: str, wrapped: nn.Module | None, world_size: int, warn: bool = True) -> str:
    """How to prune a model that `world_size` processes train with `wrapped` (the Trainer's `model_wrapped`, or the
    DDP object found around the model; None: not found): `"physical"` when DDP's reducer can be rebuilt after each
    event, `"mask"` otherwise. `mode` is `PrunerConfig.mode`; `warn` (the main process) logs why masks were chosen.
    """
    if wrapped is None:  # masks keep the shapes fixed, so whatever synchronises the ranks needs no rebuild
        if mode == "physical":
            raise ValueError(
                f"mode='physical' with world_size={world_size} rebuilds the DDP wrapper's reducer after each event, "
                "but no Trainer runs this callback and no DistributedDataParallel wraps the model: call "
                "callback.attach(trainer) after creating the Trainer, or use mode='auto' (masks, shapes fixed)."
            )
        if mode == "auto" and warn:
            logger.warning(
                f"world_size={world_size}, but the callback found neither the Trainer running it nor a "
                "DistributedDataParallel around the model: pruning with masks (shapes fixed while training, sliced "
                "by save_pruned). Call callback.attach(trainer) after creating the Trainer to prune physically, "
                "which makes the model faster as it shrinks."
            )
        return "mask"
    if not isinstance(wrapped, DistributedDataParallel):
        raise ValueError(
            f"The Trainer wraps the model in {type(wrapped).__name__}: pruning while training supports "
            "DistributedDataParallel and FSDP2 (fsdp_config={'fsdp_version': 2}). FSDP1 flattens and DeepSpeed "
            "partitions the parameters, where heads and channels cannot be found: switch to FSDP2 or DDP."
        )
    if mode == "mask":
        return "mask"
    reason = ddp_rebuild_unsupported(wrapped)
    if reason and mode == "physical":
        raise ValueError(f"mode='physical' under DDP rebuilds DDP's reducer, but {reason}. Use mode='mask'.")
    if reason:
        if warn:
            logger.warning(f"Pruning with masks (shapes fixed): physical pruning needs to rebuild DDP's reducer, but "
                           f"{reason}.")  # fmt: skip
        return "mask"
    return "physical"
