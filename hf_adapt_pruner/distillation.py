"""Recovery with the teacher: knowledge distillation from the unpruned model while `AdaptPrunerCallback` trains.

`DistillationConfig` holds the numbers; `Distiller` holds the teacher and, while training runs, replaces the student's
`forward` on the model instance (not its class, not the Trainer) so that a training forward with labels returns

    loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)

over the positions the cross-entropy scores (see `distillation_loss`). Everything that calls the model's forward
(`Trainer.compute_loss`, DDP, gradient checkpointing, TRL's `SFTTrainer`) then trains on that loss. Evaluation
forwards, forwards without labels and `generate` go to the original forward unchanged, and `stop()` restores it.

The teacher (built and checked in `teacher`) is kept out of the model's module tree: never in `state_dict`,
checkpoints, saved models, the optimizer or DDP's buckets; it is frozen (`requires_grad=False`), in eval mode and runs
under `torch.no_grad()`, one per rank.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput, logging

from .architectures import unwrap_peft
from .distillation_loss import distillation_losses, scored_positions
from .teacher import (
    BFLOAT16_RTOL,
    check_head,
    copy_as_teacher,
    logits_head,
    output_vocab_size,
    same_teacher,
    teacher_signature,
)
from .version import __version__


logger = logging.get_logger(__name__)

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keyword arguments of the student's forward that are not model inputs for the teacher.
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "logits_to_keep")
_NOT_FOR_TEACHER = (*_LOSS_KWARGS, "use_cache", "cache", "past_key_values", "return_dict", "output_attentions",
                    "output_hidden_states")  # fmt: skip


@dataclass
class DistillationConfig:
    """Distillation from a teacher while pruning (`AdaptPrunerCallback(config, distillation=DistillationConfig())`).

    Args:
        alpha (`float`, defaults to `0.5`): weight of the distillation term, in [0, 1]. `0` trains on the LM loss
            alone (the teacher still runs and `distill/kl` is logged), `1` on the KL alone. With `1` and a teacher
            that is the model itself, the callback's training-based Taylor scores would be zero at the first event
            (the KL is at its minimum there): it refuses that; use e.g. `0.99` or calibration scores.
        temperature (`float`, defaults to `1.0`): both distributions are softened by `T` in the KL term; the term
            is multiplied by `T^2` so its gradient keeps the same scale.
        teacher_dtype (`str`, *optional*): `bfloat16` or `float16` keep the teacher at half the memory of a float32
            model; `float32`, or `None` (default) to keep the dtype of the model the teacher is copied from.
        chunk_size (`int`, defaults to `256`): scored positions per chunk of the KL. Transient memory is about
            `10 * chunk_size * vocab_size * 4` bytes (256 positions x 49,152 tokens: 0.5 GB; x 151,936: 1.6 GB).

    Worked example, one scored position with `alpha=0.5, temperature=2`: if the student's cross-entropy on the
    label is 2.30 and KL(teacher || student) at T = 2 is 0.10, the position's loss is
    0.5 * 2.30 + 0.5 * 4 * 0.10 = 1.35. The Trainer normalises the sum over positions exactly as for its own loss
    (by `num_items_in_batch` under gradient accumulation), so `alpha=0` gives the LM loss (up to float rounding).
    """

    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term in [0, 1]; (1 - alpha) weighs CE."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the KL term (times T^2)."})
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Teacher weights in bfloat16 / float16 (half the memory) or float32; None: as the model."},
    )
    chunk_size: int = field(default=256, metadata={"help": "Scored positions per chunk of the KL computation."})
    library_version: str = field(default=__version__, metadata={"help": "hf_adapt_pruner version that wrote this."})

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r}: use a weight in [0, 1] (0.5 mixes CE and KL equally).")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: use a positive number (1.0: the plain softmax).")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: use None or one of {', '.join(TEACHER_DTYPES)}.")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive integer (e.g. 256).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"DistillationConfig: ignoring unknown keys {unknown} (written by another version?).")
        return cls(**{k: v for k, v in data.items() if k in known and k != "library_version"})


@dataclass
class DistilledOutput(ModelOutput):
    """What a distilling forward returns to TRL's trainers (called with `fused_lm_head=True`): per-position tensors
    of shape (B, T - 1) (or (B, T) with `shift_labels`), zero where the label is -100. `log_probs` is minus the mixed
    loss of each position, so the trainer's `-log_probs.sum() / num_tokens` is the distillation loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# student model -> weak reference to its Distiller (the Distiller holds the model: a strong value would keep both,
# and the teacher, alive for the rest of the process)
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _active(model: nn.Module) -> Distiller | None:
    ref = _ACTIVE.get(model)
    return ref() if ref is not None else None


def check_training_args(args) -> None:
    """Refuse Trainer (or TRL) arguments under which the loss is computed outside the model's forward."""
    if args.label_smoothing_factor:
        raise ValueError(
            "label_smoothing_factor > 0 makes the Trainer compute the loss outside the model, where distillation "
            "cannot mix it in: set label_smoothing_factor=0 (the KL term already softens the targets)."
        )
    if getattr(args, "loss_type", "nll") not in ("nll", None):
        raise ValueError(f"loss_type={args.loss_type!r} (TRL) reweights the per-token loss; distillation "
                         "supports loss_type='nll'.")  # fmt: skip


def stop_distillation(model: nn.Module) -> None:
    """Put back the own forward of `model` (PEFT unwrapped) if a distiller is still installed on it: after a run
    that stopped with an exception (the Trainer calls no `on_train_end` then), while its Trainer is still alive."""
    distiller = _active(unwrap_peft(model))
    if distiller is not None:
        distiller.stop()


def _distilling_forward(self, *args, **kwargs):
    """Installed as `model.forward` (bound to the model); finds this model's distiller."""
    distiller = _active(self)
    if distiller is None:  # a deep copy of a distilling model, or its distiller is gone: the class's forward, for good
        if _is_distilling(self.__dict__.get("forward")):
            del self.__dict__["forward"]
        return type(self).forward(self, *args, **kwargs)
    return distiller.forward(self, *args, **kwargs)


def _is_distilling(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), "_hf_adapt_pruner_distilling", False)


def _install_distilling_forward(model: nn.Module) -> None:
    """`model.forward = _distilling_forward` bound to `model`, with the signature of the class's forward: the Trainer
    keeps only the dataset columns that this signature names (a Trainer built while it is installed included)."""

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return _distilling_forward(self, *args, **kwargs)

    forward._hf_adapt_pruner_distilling = True
    model.forward = types.MethodType(forward, model)


class Distiller:
    """The teacher and the distilling forward of one training run (the engine behind the callback's option).

    ```python
    distiller = Distiller(DistillationConfig(alpha=0.5))   # teacher=None: a frozen copy of the model at start()
    distiller.start(model)                                 # model.forward now returns the mixed loss in training
    ...                                                    # train (any loop calling model(**batch, labels=...))
    distiller.pop_logs()                                   # {"distill/ce": ..., "distill/kl": ...} since last call
    distiller.stop()                                       # original forward back, teacher released
    ```
    """

    def __init__(self, config: DistillationConfig, teacher: nn.Module | None = None):
        self.config = config
        self.given_teacher = teacher
        self.teacher: nn.Module | None = None
        self.signature: dict[str, Any] | None = None
        self.backward_passes = 0  # backward passes through a distillation loss since start() or check_step()
        self.seconds = 0.0  # wall time of the teacher and the loss (the student's forward excluded)
        self._student: nn.Module | None = None
        self._saved_forward = None  # the instance-level forward found at start() (accelerate's, TRL's) or None
        self._previous = None  # what the distilling forward calls for the student
        self._arg_names: list[str] = []
        self._head = None
        self._autocast: torch.dtype | None = None
        self._stats: torch.Tensor | None = None  # (ce sum, kl sum, positions) since the last pop_logs()
        self._device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.teacher is not None

    def is_copy_of(self, model: nn.Module) -> bool:
        """Whether the teacher is `model` as it is now: the copy `start()` takes, or a given teacher with the same
        weights (to float rounding; a bfloat16 copy included). The KL term and its gradient are then zero."""
        if self.given_teacher is None:
            return True
        given, live = teacher_signature(unwrap_peft(self.given_teacher)), teacher_signature(unwrap_peft(model))
        return same_teacher(given, live, rtol=BFLOAT16_RTOL)

    # --- set-up and tear-down -----------------------------------------------------------------------------------
    def start(self, model: nn.Module, autocast: torch.dtype | None = None, resuming_at: int = 0,
              stored_signature: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Build (or take) the teacher, check it, and install the distilling forward on `model` (PEFT unwrapped).
        `resuming_at > 0`: the model is a checkpoint's, so the teacher must be given; `stored_signature` (from the
        run's first start) must then match it."""
        student = unwrap_peft(model)
        stop_distillation(student)  # left installed by a run that failed before on_train_end
        if _is_distilling(student.__dict__.get("forward")):  # a deep copy of a distilling model
            del student.__dict__["forward"]
        teacher = self._teacher_for(student, resuming_at)
        signature = teacher_signature(teacher)
        if stored_signature is not None and not same_teacher(signature, stored_signature):
            raise ValueError(
                f"The teacher differs from the one this run started with ({signature['num_parameters']:,} parameters "
                f"vs {stored_signature['num_parameters']:,}, or different weights). Resume with the same teacher: "
                "the original model, loaded as it was when training started (same weights, same teacher_dtype)."
            )
        head = logits_head(teacher)
        check_head(teacher, head)
        self.teacher, self.signature, self._head, self._autocast = teacher, signature, head, autocast
        self._student, self._saved_forward = student, student.__dict__.get("forward")
        self._device = next(student.parameters()).device
        self._previous = student.forward
        self._arg_names = list(inspect.signature(type(student).forward).parameters)[1:]
        _ACTIVE[student] = weakref.ref(self)
        _install_distilling_forward(student)
        self.backward_passes = 0
        logger.info(f"Distillation: alpha {self.config.alpha}, temperature {self.config.temperature}, teacher "
                    f"{signature['num_parameters']:,} parameters in {next(teacher.parameters()).dtype}")  # fmt: skip

    def _teacher_for(self, student: nn.Module, resuming_at: int) -> nn.Module:
        dtype = TEACHER_DTYPES.get(self.config.teacher_dtype)
        if self.given_teacher is None:
            if resuming_at > 0:
                raise ValueError(
                    f"Resuming at step {resuming_at} with distillation: the model is now the checkpoint's (pruned and "
                    "trained), not the original the teacher was copied from. Pass the original model as teacher: "
                    "AdaptPrunerCallback(config, distillation=..., teacher=<the model as loaded before training>). "
                    "(TrainingArguments(restore_callback_states_from_checkpoint=True) rebuilds callbacks from stored "
                    "arguments, which cannot hold a teacher: leave it False.)"
                )
            return copy_as_teacher(student, dtype)
        teacher = unwrap_peft(self.given_teacher)
        student_params = {p.data_ptr() for p in student.parameters()}
        if any(p.data_ptr() in student_params for p in teacher.parameters()):
            raise ValueError(
                "The teacher shares weights with the model being trained: pass a separate copy of the original model, "
                "or teacher=None for a frozen copy taken when training starts."
            )
        if output_vocab_size(teacher) != output_vocab_size(student):
            raise ValueError(
                f"The teacher's vocabulary has {output_vocab_size(teacher):,} entries and the student's "
                f"{output_vocab_size(student):,}: distillation compares next-token distributions over the same "
                "tokens, so the teacher must use the student's tokenizer (and the same padded vocabulary size)."
            )
        if getattr(teacher, "hf_device_map", None) is None:
            teacher.to(next(student.parameters()).device)
        if dtype is not None:  # parameters only, as copy_as_teacher: buffers (rotary frequencies) keep their dtype
            for param in teacher.parameters():
                param.data = param.data.to(dtype)
        return teacher.eval().requires_grad_(False)

    def stop(self) -> None:
        """Put the model's own forward back and release the teacher."""
        student = self._student
        if student is not None and _active(student) is self:
            del _ACTIVE[student]
            if self._saved_forward is not None:
                student.forward = self._saved_forward
            else:
                student.__dict__.pop("forward", None)
        self._student = self._previous = self._saved_forward = self._head = self.teacher = None

    # --- the forward ------------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, *args, **kwargs):
        if args:  # positional arguments, by the names of the model class's forward
            kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        plain = not model.training or not torch.is_grad_enabled() or self.teacher is None
        if plain or (labels is None and shift_labels is None):
            return self._previous(**kwargs)  # evaluation, generation, calibration and metric passes: unchanged
        if kwargs.get("input_ids") is None:
            raise ValueError("Distillation needs input_ids (the teacher embeds them itself), not inputs_embeds.")
        fused = kwargs.pop("fused_lm_head", False)
        num_items = kwargs.pop("num_items_in_batch", None)
        for key in ("labels", "shift_labels", "logits_to_keep"):
            kwargs.pop(key, None)
        outputs = self._previous(**kwargs)  # the student: its logits, no loss
        start = time.perf_counter()
        logits = outputs[0] if isinstance(outputs, tuple) else outputs.logits
        targets = scored_positions(labels, shift_labels)
        device = next(self.teacher.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items() if k not in _NOT_FOR_TEACHER}
        with self._autocast_context(device):
            with torch.no_grad():
                hidden = self.teacher.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
            losses = distillation_losses(logits, hidden, targets, self._head, self.config.alpha,
                                         self.config.temperature, self.config.chunk_size)  # fmt: skip
        norm = num_items if num_items is not None else max(losses.rows.numel(), 1)
        loss = losses.mixed.sum() / norm
        if losses.mixed.requires_grad:  # the loss and TRL's per-position values both come from it
            losses.mixed.register_hook(self._count_backward)
        self._record(losses)
        self.seconds += time.perf_counter() - start
        if fused:
            return self._fused_output(loss, logits, losses, targets, shifted=shift_labels is None)
        if isinstance(outputs, tuple):
            return (loss, *outputs)
        if "loss" not in _field_names(outputs):
            raise TypeError(f"{type(outputs).__name__} has no loss field to carry the distillation loss.")
        return type(outputs)(**{**outputs, "loss": loss})  # a new object, so that `loss` comes first

    def _autocast_context(self, device: torch.device):
        return torch.autocast(device.type, dtype=self._autocast, enabled=self._autocast is not None)

    def _fused_output(self, loss, logits, losses, targets, shifted: bool) -> DistilledOutput:
        mask = targets != -100  # (B, T)

        def grid(values: torch.Tensor) -> torch.Tensor:
            full = values.new_zeros(mask.shape).masked_scatter(mask, values)
            return full[:, :-1] if shifted else full

        return DistilledOutput(loss=loss, logits=logits, log_probs=grid(-losses.mixed), entropy=grid(losses.entropy),
                               is_top1=grid(losses.is_top1), label_mask=mask[:, :-1] if shifted else mask)  # fmt: skip

    # --- statistics -------------------------------------------------------------------------------------------
    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backward_passes += 1

    def _record(self, losses) -> None:
        stats = torch.stack([losses.ce.sum(), losses.kl.sum(), losses.ce.new_tensor(float(losses.rows.numel()))])
        self._stats = stats if self._stats is None else self._stats + stats

    def check_step(self, step: int) -> None:
        """At the end of a training step: the step's backward pass went through the distillation loss."""
        if self.backward_passes == 0:
            raise RuntimeError(
                f"Distillation is on, but the backward pass of step {step} did not go through the distillation loss: "
                "the training loss is computed outside the model or from its logits (compute_loss_func, label "
                "smoothing, a Trainer subclass's compute_loss), where the teacher cannot be mixed in."
            )
        self.backward_passes = 0

    def pop_logs(self) -> dict[str, float]:
        """`distill/ce` and `distill/kl` per scored position since the last call, over all ranks (a collective
        in multi-process runs: call it on every rank)."""
        stats = self._stats if self._stats is not None else torch.zeros(3, device=self._device)
        self._stats = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        ce, kl, n = stats.tolist()
        return {"distill/ce": ce / n, "distill/kl": kl / n} if n else {}


def _field_names(outputs) -> set[str]:
    return {f.name for f in dataclasses.fields(outputs)} if dataclasses.is_dataclass(outputs) else set()
