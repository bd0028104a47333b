"""Held-out perplexity and a generated sample: the numbers every prune run reports."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token loss) over token blocks (N, T); every block is scored on its T - 1 predictions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", leave=False, disable=not progress):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def generate_sample(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 40, min_new_tokens: int = 8
) -> str:
    """Greedy continuation of `prompt` (through the chat template when the tokenizer has one), of at least
    `min_new_tokens` tokens: a pruned instruct model may otherwise end its turn at once, which shows nothing."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: CUDA runs asynchronously, so a clock read after a forward that returned
    would time the kernel launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_speed(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Median forward latency over the prompt and greedy `generate` tokens/s (KV cache on), after one warm-up."""
    model.eval()
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids)
    model(ids, attention_mask=mask)  # warm-up
    forward, decode = [], []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        model(ids, attention_mask=mask)
        _synchronize(device)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        _synchronize(device)
        decode.append((out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start))
    return {"forward_ms": 1000 * statistics.median(forward), "generate_tokens_per_s": statistics.median(decode)}
