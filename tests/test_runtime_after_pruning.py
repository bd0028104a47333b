"""A pruned model still runs: eager and sdpa attention, generate() with a KV cache, and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_adapt_pruner import PrunerConfig, prune_model
from hf_adapt_pruner.importance import LayerSimilarityCollector

from tiny_models import VOCAB, calibration_blocks, tiny_model


CONFIG = PrunerConfig(target_ratio=0.6, amplitude=0.1, inner_steps=3, calibration_samples=8, round_to=1)


@pytest.mark.parametrize("gqa_ratio", [1, 3])
def test_eager_and_sdpa_agree_and_generate_with_cache(model_type, gqa_ratio):
    model = tiny_model(model_type, gqa_ratio)
    prune_model(model, CONFIG, calibration_blocks(), progress=False)
    heads = model.config.pruned_layout["num_attention_heads"]
    assert len(set(heads)) > 1 or heads[0] < 6  # really pruned
    prompt = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    implementations = ["sdpa", "eager"] if model._supports_sdpa else ["eager"]  # Gemma 2: eager only (soft-capping)
    with torch.no_grad():
        eager = model(prompt).logits
        model.set_attn_implementation(implementations[0])
        sdpa = model(prompt).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                  use_cache=False)  # fmt: skip
        assert cached.shape == (2, 13)
        assert torch.equal(cached, uncached)


def test_pruned_layers_keep_training_with_sliced_adam_state():
    torch.manual_seed(0)
    model = tiny_model("llama", gqa_ratio=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = calibration_blocks(n=4, seq_len=16)
    for _ in range(2):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params_before = {id(p) for p in model.parameters()}
    prune_model(model, CONFIG, calibration_blocks(), optimizer=optimizer, progress=False)
    assert {id(p) for p in model.parameters()} == params_before  # same Parameter objects
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
    q_proj = model.model.layers[0].self_attn.q_proj
    snapshot = q_proj.weight.detach().clone()
    losses = []
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert not torch.equal(q_proj.weight, snapshot)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_unsliceable_optimizer_state_is_refused():
    model = tiny_model("llama", gqa_ratio=1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    q_proj = model.model.layers[0].self_attn.q_proj
    optimizer.state[q_proj.weight]["odd"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="cannot be sliced"):
        prune_model(model, CONFIG, calibration_blocks(), optimizer=optimizer, progress=False)


class _Shift(nn.Module):
    def __init__(self, amount: float):
        super().__init__()
        self.amount = amount

    def forward(self, hidden_states):  # x + a * (x rotated by 90 degrees in coordinate pairs): cos = 1/sqrt(1+a^2)
        pairs = hidden_states.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return hidden_states + self.amount * rotated


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "manhattan"])
def test_layers_that_move_their_input_more_are_more_important(metric):
    layers = [_Shift(0.01), _Shift(1.0), _Shift(0.1)]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with LayerSimilarityCollector(layers, metric) as collector:
        h = x
        for layer in layers:
            h = layer(h)
    importance = collector.importance()
    assert importance.argsort().tolist() == [0, 2, 1]
    assert not layers[0]._forward_hooks  # hooks removed on exit


def test_collector_ignores_padding():
    layer = _Shift(1.0)
    x = torch.randn(1, 4, 8)
    with LayerSimilarityCollector([layer], "euclidean") as full:
        layer(x[:, :2])
    with LayerSimilarityCollector([layer], "euclidean") as masked:
        masked.token_mask = torch.tensor([[1, 1, 0, 0]])
        layer(x)
    torch.testing.assert_close(full.importance(), masked.importance())
