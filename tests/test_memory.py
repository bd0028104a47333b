"""Memory savings of a prune event that must not change what it computes: calibration micro-batches, recomputed
layer activations, packed Gram matrices."""

from __future__ import annotations

import pytest
import torch

from hf_adapt_pruner import PrunerConfig
from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.data import CalibrationPool
from hf_adapt_pruner.reconstruction import GramStatistics
from hf_adapt_pruner.scorers import CalibrationScorer, micro_batches, recomputed, recomputes

from tiny_models import MODEL_TYPES, calibration_blocks, tiny_model


def padded_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of 4 sequences, left-padded to different lengths (padding must weigh nothing in any split)."""
    ids = calibration_blocks(8, 20, seed=3)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 7, 1, 0, 12, 5, 2]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]


def measure(model, micro_batch_size: int | None, checkpointing: str = "off"):
    """(layer importance, group scores, Gram matrices) of one calibration measurement."""
    layers = layer_modules(model, get_architecture(model.config.model_type))
    head_dim = model.config.head_dim
    pool = CalibrationPool(padded_batches(), num_samples=8, batch_size=4, seed=0)
    scorer = CalibrationScorer(model, pool, "cosine", "taylor", seed=0, progress=False, collect_grams=True,
                               micro_batch_size=micro_batch_size, checkpointing=checkpointing)  # fmt: skip
    importance, scores = scorer(layers, head_dim)
    return importance, scores, scorer.grams


@pytest.mark.parametrize(("model_type", "size"), [(t, 1) for t in MODEL_TYPES] + [("llama", 3)])
def test_micro_batches_give_the_scores_and_statistics_of_whole_batches(model_type, size):
    model = tiny_model(model_type, gqa_ratio=3, layers=2)
    whole = measure(model, None)
    split = measure(model, size)  # one sequence per pass; parts of unequal sizes (3 + 1)
    assert_same_measurement(split, whole)
    assert whole[2].tokens == int(sum(b["attention_mask"].sum() for b in padded_batches()))


def assert_same_measurement(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    for x, y in zip(a[1], b[1]):
        for name in ("q_heads", "kv_heads", "channels"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-4, atol=1e-9)
    assert a[2].tokens == b[2].tokens
    for key in b[2].grams:
        torch.testing.assert_close(a[2].matrix(key), b[2].matrix(key), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_recomputed_layers_give_the_same_scores_and_count_each_token_once(model_type):
    model = tiny_model(model_type, gqa_ratio=3, layers=2)
    layers = layer_modules(model, get_architecture(model_type))
    recomputed = measure(model, 2, checkpointing="on")
    assert all("forward" not in lm.layer.__dict__ for lm in layers)  # the class's forward again
    assert_same_measurement(recomputed, measure(model, 2))


def saved_bytes(model, checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward pass of one calibration forward."""
    layers = [lm.layer for lm in layer_modules(model, get_architecture(model.config.model_type))]
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    ids = calibration_blocks(2, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recomputed(layers if checkpointing else []):
        model(ids, labels=ids, use_cache=False).loss.backward()  # as the scorer runs it
    return sum(sizes)


def test_recomputed_layers_keep_less_for_the_backward_pass():
    model = tiny_model("llama", layers=4)
    kept, plain = saved_bytes(model, True), saved_bytes(model, False)
    assert kept < 0.6 * plain, (kept, plain)


def test_auto_recomputes_where_a_pass_would_keep_much():
    model = tiny_model("llama")  # about 2,000 output features over its 3 layers: 64 MiB at about 4,000 tokens
    layers = layer_modules(model, get_architecture("llama"))
    short, long = [{"input_ids": torch.zeros(1, 32, dtype=torch.long)}], [{"input_ids": torch.zeros(2, 4096)}]
    assert not recomputes("auto", model, layers, short) and recomputes("auto", model, layers, long)
    assert recomputes("on", model, layers, short) and not recomputes("off", model, layers, long)


def test_gram_matrices_count_each_token_once_under_the_trainers_activation_checkpointing():
    counts = []
    for checkpointing in (False, True):
        model = tiny_model("llama", layers=2).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        grams = GramStatistics(layer_modules(model, get_architecture("llama")))
        batch = calibration_blocks(2, 8)
        with grams:
            model(batch, labels=batch).loss.backward()
        counts.append((grams.tokens, [grams.matrix(key) for key in grams.grams]))
    assert counts[0][0] == counts[1][0] == 16
    for a, b in zip(counts[0][1], counts[1][1]):
        torch.testing.assert_close(a, b)


def test_no_pass_holds_more_sequences_than_the_micro_batch():
    model = tiny_model("llama")
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)  # fmt: skip
    layers = layer_modules(model, get_architecture("llama"))
    pool = CalibrationPool(calibration_blocks(10, 16), num_samples=10, batch_size=4, seed=0)
    CalibrationScorer(model, pool, "cosine", "taylor", seed=0, progress=False, micro_batch_size=3)(layers, 8)
    handle.remove()
    assert seen == [3, 1, 3, 1, 2]  # batches 4, 4, 2 in parts of at most 3
    assert all(p.grad is None for p in model.parameters())  # the measurement's gradients are gone with it


def test_micro_batches_are_views_of_the_batch():
    batch = {"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    parts = micro_batches(batch, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 1]
    assert all(p["input_ids"].untyped_storage().data_ptr() == batch["input_ids"].untyped_storage().data_ptr()
               for p in parts)  # fmt: skip
    assert micro_batches(batch, None) == [batch] and micro_batches(batch, 4) == [batch]


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_a_bad_micro_batch_size_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match=rf"calibration_micro_batch_size={value!r} must be a positive integer"):
        PrunerConfig(target_ratio=0.7, calibration_micro_batch_size=value)


def test_prune_model_passes_the_configured_micro_batch_size(monkeypatch):
    from hf_adapt_pruner import prune_model

    sizes = []
    original = CalibrationScorer._run
    monkeypatch.setattr(CalibrationScorer, "_run", lambda self, *a: sizes.append(self.micro_batch_size) or
                        original(self, *a))  # fmt: skip
    config = PrunerConfig(target_ratio=0.8, inner_steps=1, calibration_samples=4, calibration_micro_batch_size=2)
    prune_model(tiny_model("llama"), config, calibration_blocks(), progress=False)
    assert sizes == [2]


@pytest.mark.parametrize("width", [130, 1536])
def test_gram_matrices_are_stored_as_the_lower_triangle_in_row_blocks(width):
    from hf_adapt_pruner.reconstruction import _row_blocks, gram_bytes

    blocks = _row_blocks(width)
    assert blocks[0][0] == 0 and blocks[-1][1] == width and [s for s, _ in blocks[1:]] == [e for _, e in blocks[:-1]]
    stored = gram_bytes(width) // 4  # float32 entries
    assert stored < 0.55 * width**2 if width >= 1024 else stored < width**2  # about half the bytes of the whole


def test_gram_matrices_unpack_whole_and_keep_the_selected_inputs():
    model = tiny_model("llama", layers=2)
    layers = layer_modules(model, get_architecture("llama"))
    inputs = []
    handle = layers[1].mlp.down_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    grams = GramStatistics(layers)
    with grams, torch.no_grad():
        model(calibration_blocks(3, 10))
    handle.remove()
    x = inputs[0].reshape(-1, inputs[0].shape[-1])  # (tokens, intermediate)
    key = (1, next(i for i, p in enumerate(layers[1].pruned) if p.module is layers[1].mlp.down_proj))
    assert len(grams.grams[key]) > 1  # the tiny model's width spans several row blocks
    torch.testing.assert_close(grams.matrix(key), x.T @ x, rtol=1e-5, atol=1e-5)
    kept = torch.tensor([70, 0, 5, 6, 40, 66])  # any order: rows and columns come out in this order
    grams.select_(1, {key[1]: kept})
    torch.testing.assert_close(grams.matrix(key), (x.T @ x)[kept][:, kept], rtol=1e-5, atol=1e-5)
    assert grams.matrix((7, 0)) is None


def test_a_sample_without_targets_is_refused_rather_than_scored_zero():
    model = tiny_model("llama", layers=2)
    layers = layer_modules(model, get_architecture("llama"))
    ids = calibration_blocks(2, 6)
    mask = torch.zeros_like(ids)
    mask[:, -1] = 1  # one real token per sequence: nothing to predict
    pool = CalibrationPool([{"input_ids": ids, "attention_mask": mask}], num_samples=2, batch_size=2, seed=0)
    scorer = CalibrationScorer(model, pool, "cosine", "taylor", seed=0, progress=False, micro_batch_size=1)
    with pytest.raises(ValueError, match="no next-token target"):
        scorer(layers, 8)
    assert all(p.grad is None for p in model.parameters())
