"""The distillation loss, chunked over positions so that no (positions, vocabulary) tensor of the teacher exists.

Per scored position i (its next-token label y_i is not -100), with student logits z_i, teacher logits u_i, mixing
weight `alpha` and temperature `T`:

    loss_i = (1 - alpha) * CE(z_i, y_i) + alpha * T^2 * KL( softmax(u_i / T) || softmax(z_i / T) )

The T^2 factor keeps the gradient of the KL term at the same scale for every T (Hinton et al., 2015). Its gradient
with respect to z_i has a closed form,

    d loss_i / d z_i = (1 - alpha) * (softmax(z_i) - onehot(y_i)) + alpha * T * (softmax(z_i / T) - softmax(u_i / T))

so `ChunkedDistillation` computes it chunk by chunk in the forward pass (float32, the teacher's logits for one chunk
at a time) and keeps only that gradient, in the logits' dtype, for the backward pass. Memory beyond the student's
logits: the gradient rows (positions x vocabulary, logits dtype) and, transiently, a few float32 tensors of
`chunk_size x vocabulary`. The stock cross-entropy keeps a float32 copy of the logits and their log-softmax instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PositionLosses:
    """Per scored position (N = number of labels that are not -100), in the order of `rows`."""

    mixed: torch.Tensor  # (N,) float32, differentiable: the loss above
    ce: torch.Tensor  # (N,) float32, cross-entropy of the student (T = 1)
    kl: torch.Tensor  # (N,) float32, KL(teacher || student) at temperature T (without the T^2 factor)
    entropy: torch.Tensor  # (N,) float32, entropy of the student's next-token distribution (T = 1)
    is_top1: torch.Tensor  # (N,) bool, the label is the student's most likely token
    rows: torch.Tensor  # (N,) long, positions in the flattened (batch * seq) grid


def scored_positions(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets aligned with the logits' positions, (B, T), -100 where nothing is scored.

    `labels` are shifted as transformers' causal-LM loss does (position t predicts label t + 1; the last position
    predicts nothing); `shift_labels` (padding-free and context-parallel collators) are already aligned.
    """
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[:, 1:], (0, 1), value=-100)


class ChunkedDistillation(torch.autograd.Function):
    """`forward(logits (B, T, V), teacher_hidden (N, H), targets (N,), rows (N,), head, alpha, T, chunk_size)`.

    `head` maps teacher hidden states (c, H) to teacher logits (c, V); it runs without gradients, one chunk at a
    time. Returns the five per-position tensors of `PositionLosses` (only the first is differentiable).
    """

    @staticmethod
    def forward(ctx, logits, teacher_hidden, targets, rows, head, alpha, temperature, chunk_size):
        flat = logits.detach().view(-1, logits.shape[-1])  # (B*T, V)
        n = rows.numel()
        grad_rows = flat.new_empty((n, flat.shape[1]))  # (N, V) in the logits' dtype: all the backward needs
        out = {k: torch.empty(n, device=flat.device) for k in ("mixed", "ce", "kl", "entropy")}
        is_top1 = torch.empty(n, dtype=torch.bool, device=flat.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                part = slice(start, min(start + chunk_size, n))
                teacher_logits = head(teacher_hidden[part])  # (c, V), autocast as the caller set it
                with torch.autocast(flat.device.type, enabled=False):
                    values = _chunk(flat[rows[part]].float(), teacher_logits.float().to(flat.device),
                                    targets[part], alpha, temperature)  # fmt: skip
                grad_rows[part] = values.pop("grad").to(grad_rows.dtype)
                is_top1[part] = values.pop("is_top1")
                for key, value in values.items():
                    out[key][part] = value
        ctx.save_for_backward(grad_rows, rows)
        ctx.logits_shape, ctx.chunk_size = logits.shape, chunk_size
        ctx.mark_non_differentiable(out["ce"], out["kl"], out["entropy"], is_top1)
        return out["mixed"], out["ce"], out["kl"], out["entropy"], is_top1

    @staticmethod
    def backward(ctx, grad_mixed, *unused):
        grad_rows, rows = ctx.saved_tensors
        shape = ctx.logits_shape
        grad = grad_rows.new_zeros((shape[:-1].numel(), shape[-1]))  # (B*T, V)
        for start in range(0, rows.numel(), ctx.chunk_size):  # scaled in float32, chunk by chunk
            part = slice(start, start + ctx.chunk_size)
            grad[rows[part]] = (grad_rows[part].float() * grad_mixed[part].float()[:, None]).to(grad.dtype)
        return grad.view(shape), None, None, None, None, None, None, None


def _chunk(z: torch.Tensor, u: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float) -> dict:
    """Losses and the gradient for one chunk: z student logits (c, V), u teacher logits (c, V), y labels (c,)."""
    log_q = torch.log_softmax(z, dim=-1)  # student, T = 1
    q = log_q.exp()
    ce = -log_q.gather(1, y[:, None]).squeeze(1)
    entropy = -(q * log_q).sum(-1)
    is_top1 = z.argmax(-1) == y
    log_q_t = log_q if temperature == 1.0 else torch.log_softmax(z / temperature, dim=-1)
    log_p_t = torch.log_softmax(u / temperature, dim=-1)  # teacher
    p_t = log_p_t.exp()
    kl = (p_t * (log_p_t - log_q_t)).sum(-1)
    diff = (q if temperature == 1.0 else log_q_t.exp()) - p_t  # a new tensor: q is changed in place below
    grad = q.mul_(1.0 - alpha)  # (1 - alpha) * softmax(z), in place: q is not needed any more
    grad.scatter_add_(1, y[:, None], torch.full_like(ce[:, None], alpha - 1.0))  # - (1 - alpha) * onehot(y)
    grad.add_(diff, alpha=alpha * temperature)  # + alpha * T * (softmax(z / T) - softmax(u / T))
    mixed = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return {"grad": grad, "mixed": mixed, "ce": ce, "kl": kl, "entropy": entropy, "is_top1": is_top1}


def distillation_losses(
    logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    temperature: float,
    chunk_size: int,
) -> PositionLosses:
    """Per-position losses of the student `logits` (B, T, V) against the teacher, for the positions whose `targets`
    (B, T; see `scored_positions`) are not -100. `teacher_hidden` (B, T, H) are the teacher's final hidden states
    (after its last norm); `head` turns a chunk of them into logits."""
    flat_targets = targets.reshape(-1).to(logits.device)
    rows = (flat_targets != -100).nonzero().squeeze(1)  # (N,)
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows.to(teacher_hidden.device)]  # (N, H)
    mixed, ce, kl, entropy, is_top1 = ChunkedDistillation.apply(
        logits, hidden, flat_targets[rows], rows, head, float(alpha), float(temperature), int(chunk_size)
    )
    return PositionLosses(mixed, ce, kl, entropy, is_top1, rows)
