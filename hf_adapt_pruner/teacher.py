"""The teacher of a distillation run: a frozen copy of the student (cast, LoRA merged) or a given model, checked
against the student, and a fingerprint of its weights to recognise it again when a run resumes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import detached_copy, remove_lora_layers_, unwrap_peft
from .sharding import has_sharded_parameters


def output_vocab_size(model: nn.Module) -> int:
    return unwrap_peft(model).get_output_embeddings().weight.shape[0]


def copy_as_teacher(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A frozen copy of `model`, in eval mode, whose parameters are cast to `dtype` while copying (no full-precision
    copy first); buffers (rotary frequencies) keep their dtype. Tied weights stay tied; LoRA adapters are merged."""
    if has_sharded_parameters(model):
        raise ValueError(
            "The model's parameters are sharded (FSDP2): a copy would be sharded too. Pass a full teacher on every "
            "rank: AdaptPrunerCallback(config, distillation=..., teacher=original_model)."
        )
    memo = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = nn.Parameter(param.detach().to(dtype or param.dtype, copy=True), requires_grad=False)
    # LoRA merged: the teacher computes what the model computed, without the adapter branches, and its fingerprint is
    # the merged model's (the plain original when the adapters are new, with lora_B zero)
    teacher = remove_lora_layers_(detached_copy(model, memo), merge=True)
    return teacher.eval()  # no dropout


def teacher_signature(teacher: nn.Module) -> dict[str, Any]:
    """A fingerprint of the teacher's weights (JSON), stored with the callback's state to check it on resume: sizes,
    sums of |w| and w² over all weights, and the sum of |w| of each tensor in order (so that the same weights in
    another arrangement, layers swapped, do not pass)."""
    abs_sums, sq_sum = [], 0.0
    with torch.no_grad():
        for param in teacher.parameters():
            abs_sum = 0.0
            for values in param.detach().reshape(-1).split(1 << 22):  # float64 in slices: a small transient copy
                values = values.double()
                abs_sum += float(values.abs().sum())
                sq_sum += float(values.square().sum())
            abs_sums.append(abs_sum)
    n = sum(p.numel() for p in teacher.parameters())
    return {"num_parameters": n, "vocab_size": output_vocab_size(teacher), "abs_sum": sum(abs_sums), "sq_sum": sq_sum,
            "abs_sums": abs_sums}  # fmt: skip


# A bfloat16 cast (round to nearest, 8 significant bits) moves each weight by at most 2**-8 of itself: each |w| sum
# by at most 2**-8, the w² sum by at most (1 + 2**-8)**2 - 1 < 2**-7. Float16 has 11 bits, but below 2**-14 (6e-5)
# its values are subnormal, 2**-24 apart: a weight moves by at most 2**-11 of itself plus 2**-25, so a tensor's |w|
# sum stays within 2**-7 unless its mean |w| is below 2**-25 / (2**-7 - 2**-11), about 4e-6 (tested at 1e-5).
BFLOAT16_RTOL = 2**-7


def same_teacher(a: dict[str, Any], b: dict[str, Any], rtol: float = 1e-4) -> bool:
    """Equal sizes and sums, to `rtol` (compare a bfloat16 copy with its float32 original at `BFLOAT16_RTOL`). A
    signature stored before per-tensor sums existed is compared without them."""
    if a["num_parameters"] != b["num_parameters"] or a["vocab_size"] != b["vocab_size"]:
        return False
    pairs = [(a[k], b[k]) for k in ("abs_sum", "sq_sum")]
    if "abs_sums" in a and "abs_sums" in b:
        if len(a["abs_sums"]) != len(b["abs_sums"]):
            return False
        pairs += zip(a["abs_sums"], b["abs_sums"])
    return all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in pairs)


def logits_head(model: nn.Module):
    """`hidden (c, H) -> logits (c, V)`: the output embedding plus the final transforms some configs declare
    (`logit_scale` / `logits_scaling` multipliers, `final_logit_softcapping`). `check_head` verifies it."""
    lm_head = model.get_output_embeddings()
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling  # Granite divides
    cap = getattr(config, "final_logit_softcapping", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return head


def check_head(model: nn.Module, head) -> None:
    """Refuse a teacher whose logits `head` cannot reproduce from its final hidden states."""
    embeddings = model.get_input_embeddings().weight
    ids = torch.arange(1, 9, device=embeddings.device)[None] % embeddings.shape[0]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
        got = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-5):
        raise ValueError(
            f"The teacher ({type(model).__name__}) computes its logits from its hidden states in a way distillation "
            "does not reproduce (max difference {:.3g}); only output embeddings with logit_scale / logits_scaling / "
            "final_logit_softcapping are supported. Please report the architecture.".format(
                float((got - expected).abs().max())
            )
        )
