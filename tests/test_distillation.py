"""Distillation from the unpruned teacher: the loss, its chunking, and the forward it installs (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_adapt_pruner.distillation import DistillationConfig, Distiller
from hf_adapt_pruner.distillation_loss import distillation_losses, scored_positions
from hf_adapt_pruner.teacher import BFLOAT16_RTOL, copy_as_teacher, same_teacher, teacher_signature

from tiny_models import MODEL_TYPES, VOCAB, calibration_blocks, tiny_model


def direct_loss(logits, teacher_logits, targets, alpha, temperature, norm=None):
    """The formula written out on every scored position at once (no chunks, no custom gradient)."""
    mask = targets != -100
    z, u, y = logits[mask].float(), teacher_logits[mask].float(), targets[mask]
    ce = F.cross_entropy(z, y, reduction="none")
    kl = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(u / temperature, -1), log_target=True,
                  reduction="none").sum(-1)  # fmt: skip
    mixed = (1 - alpha) * ce + alpha * temperature**2 * kl
    return mixed.sum() / (norm if norm is not None else mask.sum()), ce, kl


def random_case(seed=0, batch=3, seq=7, vocab=11, hidden=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g) * 3
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight.data = torch.randn(vocab, hidden, generator=g)
    teacher_hidden = torch.randn(batch, seq, hidden, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5] = -100
    return logits, teacher_hidden, head, labels


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradient_match_a_direct_computation(alpha):
    logits, hidden, head, labels = random_case()
    targets = scored_positions(labels, None)
    student = logits.clone().requires_grad_(True)
    losses = distillation_losses(student, hidden, targets, head, alpha, 2.0, chunk_size=4)
    (losses.mixed.sum() / losses.rows.numel()).backward()
    reference = logits.clone().requires_grad_(True)
    with torch.no_grad():
        teacher_logits = head(hidden)
    expected, ce, kl = direct_loss(reference, teacher_logits, targets, alpha, 2.0)
    expected.backward()
    torch.testing.assert_close(losses.mixed.sum() / losses.rows.numel(), expected.detach())
    torch.testing.assert_close(losses.ce, ce.detach())
    torch.testing.assert_close(losses.kl, kl.detach())
    torch.testing.assert_close(student.grad, reference.grad)


def test_chunked_kl_equals_the_unchunked_one():
    logits, hidden, head, labels = random_case(seed=1, batch=4, seq=9)
    targets = scored_positions(labels, None)
    results = []
    for chunk in (1, 5, 10_000):
        student = logits.clone().requires_grad_(True)
        losses = distillation_losses(student, hidden, targets, head, 0.7, 1.5, chunk_size=chunk)
        losses.mixed.sum().backward()
        results.append((losses.mixed.detach(), losses.kl, student.grad))
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a, b)


def test_positions_labelled_minus_100_are_excluded():
    logits, hidden, head, labels = random_case(seed=2)
    targets = scored_positions(labels, None)
    assert (targets[:, -1] == -100).all()  # the last position predicts nothing
    student = logits.clone().requires_grad_(True)
    losses = distillation_losses(student, hidden, targets, head, 0.5, 1.0, chunk_size=3)
    losses.mixed.sum().backward()
    assert losses.rows.numel() == int((targets != -100).sum())
    excluded = (targets == -100).flatten()
    assert student.grad.flatten(0, 1)[excluded].abs().max() == 0
    changed = logits.clone()
    changed.flatten(0, 1)[excluded] += 100.0  # the excluded positions' logits do not matter
    again = distillation_losses(changed, hidden * 1, targets, head, 0.5, 1.0, chunk_size=3)
    torch.testing.assert_close(again.mixed, losses.mixed.detach())
    shifted = distillation_losses(logits, hidden, scored_positions(None, targets), head, 0.5, 1.0, chunk_size=3)
    torch.testing.assert_close(shifted.mixed, losses.mixed.detach())  # shift_labels: already aligned


def test_distilling_forward_in_training_and_plain_forward_otherwise():
    model = tiny_model("llama", gqa_ratio=3)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # make student and teacher differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = calibration_blocks(n=2, seq_len=10)
    labels = batch.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        stock = model(input_ids=batch, labels=labels)
        teacher_logits = teacher(input_ids=batch).logits
    distiller = Distiller(DistillationConfig(alpha=0.5, temperature=2.0, chunk_size=5), teacher=teacher)
    distiller.start(model)
    model.train()
    out = model(input_ids=batch, labels=labels, num_items_in_batch=torch.tensor(30))
    expected, _, _ = direct_loss(stock.logits, teacher_logits, scored_positions(labels, None), 0.5, 2.0, norm=30)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, stock.logits)
    model.eval()
    torch.testing.assert_close(model(input_ids=batch, labels=labels).loss, stock.loss)  # evaluation: LM loss
    logs = distiller.pop_logs()
    assert set(logs) == {"distill/ce", "distill/kl"} and logs["distill/kl"] > 0
    distiller.stop()
    assert "forward" not in model.__dict__ and distiller.teacher is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_teacher_copy_is_frozen_separate_and_reproduces_logits(model_type):
    model = tiny_model(model_type, gqa_ratio=3).train()
    teacher = copy_as_teacher(model, torch.bfloat16)
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules()) and model.training
    ids = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ids for p in teacher.parameters())
    distiller = Distiller(DistillationConfig(alpha=1.0))
    distiller.start(model)  # checks that the teacher's head reproduces its logits (soft-capping, scaling)
    batch = calibration_blocks(n=2, seq_len=8)
    out = model(input_ids=batch, labels=batch)
    assert torch.isfinite(out.loss) and out.loss.item() < 1e-4  # teacher == student: KL ~ 0
    distiller.stop()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_fingerprint_knows_a_cast_copy_and_tells_other_weights_and_swapped_layers(model_type):
    model = tiny_model(model_type, gqa_ratio=3)
    signature = teacher_signature(model)
    for dtype in (torch.bfloat16, torch.float16):  # the alpha=1.0 check: a given copy in another dtype is the model
        assert same_teacher(teacher_signature(copy_as_teacher(model, dtype)), signature, rtol=BFLOAT16_RTOL)
    assert same_teacher(teacher_signature(copy_as_teacher(model, None)), signature)  # resume: like with like
    other = tiny_model(model_type, gqa_ratio=3, seed=1)
    assert not same_teacher(teacher_signature(other), signature, rtol=BFLOAT16_RTOL)
    swapped = tiny_model(model_type, gqa_ratio=3)
    layers = swapped.get_decoder().layers
    layers[0], layers[1] = layers[1], layers[0]
    assert not same_teacher(teacher_signature(swapped), signature)


def test_a_float16_copy_of_weights_in_its_subnormal_range_is_known():
    """Weights below 2**-14 are subnormal in float16 and lose relative precision (none may be flushed to zero): a
    tensor of them still passes."""
    model = tiny_model("llama", gqa_ratio=3)
    with torch.no_grad():
        model.get_decoder().layers[0].mlp.down_proj.weight.uniform_(-2e-5, 2e-5)  # mean |w| 1e-5, all subnormal
    copy = copy_as_teacher(model, torch.float16)
    assert copy.get_decoder().layers[0].mlp.down_proj.weight.abs().max() < 2**-14
    assert same_teacher(teacher_signature(copy), teacher_signature(model), rtol=BFLOAT16_RTOL)


def test_config_validates_and_round_trips():
    config = DistillationConfig(alpha=1.0, temperature=2.0, teacher_dtype="bfloat16", chunk_size=64)
    assert DistillationConfig.from_dict(config.to_dict()) == config
    for bad, message in [({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"),
                         ({"teacher_dtype": "int8"}, "teacher_dtype"), ({"chunk_size": 0}, "chunk_size")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DistillationConfig(**bad)


def test_vocabulary_mismatch_and_the_model_itself_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="vocabulary has 100 entries and the student's 128"):
        Distiller(DistillationConfig(), teacher=tiny_model("llama", vocab_size=100)).start(model)
    with pytest.raises(ValueError, match="shares weights"):
        Distiller(DistillationConfig(), teacher=model).start(model)
    assert "forward" not in model.__dict__
    assert VOCAB == 128


def started(alpha=0.5, teacher=None):
    """A tiny llama in training mode with a distiller installed, and a batch with labels."""
    model = tiny_model("llama", gqa_ratio=3).train()
    distiller = Distiller(DistillationConfig(alpha=alpha, chunk_size=5), teacher=teacher)
    distiller.start(model)
    return model, distiller, calibration_blocks(n=2, seq_len=10)


def test_a_step_whose_backward_skips_the_distillation_loss_is_refused():
    model, distiller, batch = started()
    with torch.no_grad():  # e.g. TRL's metrics forward after a compute_loss_func: the stock forward and loss
        stock = type(model).forward(model, input_ids=batch, labels=batch).loss
        torch.testing.assert_close(model(input_ids=batch, labels=batch).loss, stock)
    with pytest.raises(RuntimeError, match="backward pass of step 1 did not go through the distillation loss"):
        distiller.check_step(1)
    model(input_ids=batch, labels=batch).logits.mean().backward()  # a loss taken from the logits, not the model's
    with pytest.raises(RuntimeError, match="backward pass of step 2 did not go through the distillation loss"):
        distiller.check_step(2)
    model(input_ids=batch, labels=batch).loss.backward()
    distiller.check_step(3)  # went through it
    distiller.stop()


def test_a_distilling_model_that_is_dropped_is_freed():
    import gc
    import weakref

    model, distiller, batch = started()
    model(input_ids=batch, labels=batch).loss.backward()  # then no stop(): a run that failed
    model_ref, teacher_ref = weakref.ref(model), weakref.ref(distiller.teacher)
    del model, distiller
    gc.collect()
    assert model_ref() is None and teacher_ref() is None


def test_a_given_teacher_in_another_dtype_is_cast_as_the_copy_is():
    model = tiny_model("llama", gqa_ratio=3)
    given = copy.deepcopy(model)
    copied = copy_as_teacher(model, torch.bfloat16)
    distiller = Distiller(DistillationConfig(teacher_dtype="bfloat16"), teacher=given)
    distiller.start(model)
    buffers = {name: b.dtype for name, b in copied.named_buffers()}
    assert {name: b.dtype for name, b in given.named_buffers()} == buffers and torch.float32 in buffers.values()
    assert all(p.dtype == torch.bfloat16 for p in given.parameters())
    batch = calibration_blocks(n=1, seq_len=64)
    with torch.no_grad():
        torch.testing.assert_close(given(input_ids=batch).logits, copied(input_ids=batch).logits, rtol=0, atol=0)
    distiller.stop()
