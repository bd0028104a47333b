"""Distillation inside an unmodified Trainer and TRL's SFTTrainer, with AdaptPrunerCallback pruning the student."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig, PrunerConfig, count_parameters, load_pruned
from hf_adapt_pruner.distillation import stop_distillation
from hf_adapt_pruner.distillation_loss import scored_positions

from test_distillation import direct_loss
from tiny_models import calibration_blocks, tiny_model, tiny_tokenizer


def masked_data(n=8, seq_len=12, seed=5):
    """Rows with 0-3 leading labels masked, so micro-batches score different numbers of positions."""
    rows = []
    for i, block in enumerate(calibration_blocks(n=n, seq_len=seq_len, seed=seed)):
        labels = block.clone()
        labels[: i % 4] = -100
        rows.append({"input_ids": block, "labels": labels})
    return rows


DATA = masked_data(n=64, seq_len=16)


def make_callback(distillation=None, teacher=None, calibration_data=None, **overrides):
    values = dict(target_ratio=0.6, num_stages=2, importance_window=2, inner_steps=3, round_to=1,
                  min_intermediate_size=1)  # fmt: skip
    values.update(overrides)
    distillation = distillation or DistillationConfig(alpha=0.5, temperature=2.0, chunk_size=16)
    return AdaptPrunerCallback(PrunerConfig(**values), calibration_data, distillation=distillation, teacher=teacher)


def train(tmp_path, model, callback, data=DATA, extra_callbacks=(), resume=None, trainer_kwargs=None, **overrides):
    args = dict(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, report_to=[],
                use_cpu=True, logging_steps=3, save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
                max_grad_norm=0.0)  # fmt: skip
    args.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                      callbacks=[callback, *extra_callbacks], **(trainer_kwargs or {}))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class Watcher(TrainerCallback):
    """Records the first step's gradients and, after every step, the teacher's and the student's sizes."""

    def __init__(self, pruner_callback):
        self.pruner_callback, self.grads, self.sizes = pruner_callback, None, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        teacher = self.pruner_callback._distiller.teacher
        in_tree = any(m is teacher for m in model.modules())
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.sizes.append((count_parameters(teacher), count_parameters(model), in_tree,
                           any(id(p) in optimized for p in teacher.parameters())))  # fmt: skip


def test_prune_events_run_with_distillation_and_logs_carry_distill_values(tmp_path):
    model = tiny_model("qwen2", gqa_ratio=3).train()
    original = count_parameters(model)
    callback = make_callback()
    watcher = Watcher(callback)
    trainer = train(tmp_path, model, callback, extra_callbacks=[watcher])
    assert len(callback.reports) == 2 and count_parameters(model) == callback.reports[-1].params_after
    assert all(teacher == original and not in_tree and not optimized for teacher, _, in_tree, optimized
               in watcher.sizes)  # the teacher stays whole, outside the module tree and the optimizer  # fmt: skip
    assert watcher.sizes[-1][1] < original  # the student was pruned
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) >= 4 and all("distill/ce" in h and "distill/kl" in h for h in logs)
    assert all(h["loss"] == pytest.approx(0.5 * h["distill/ce"] + 0.5 * 4 * h["distill/kl"], rel=0.05) for h in logs)
    assert "forward" not in model.__dict__ and callback._distiller.teacher is None  # restored, released


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch(tmp_path):
    data = masked_data(n=8)
    teacher = tiny_model("llama", seed=1)  # differs from the student, so the KL term has a gradient
    grads = []
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        callback = make_callback(teacher=teacher, target_ratio=0.9, num_stages=1, importance_window=1)
        watcher = Watcher(callback)
        train(tmp_path / str(batch), tiny_model("llama").train(), callback, data, [watcher], max_steps=2,
              per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)  # fmt: skip
        grads.append(watcher.grads)
    student = tiny_model("llama").train()  # the same step by hand: all 8 rows, one normalisation
    ids, labels = torch.stack([r["input_ids"] for r in data]), torch.stack([r["labels"] for r in data])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    loss, _, _ = direct_loss(student(input_ids=ids).logits, teacher_logits, scored_positions(labels, None), 0.5, 2.0)
    loss.backward()
    for name, param in student.named_parameters():
        for got in grads:
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "teacher_dtype"),
    [({"bf16": True}, None), ({"bf16": True}, "bfloat16"), ({"activation_checkpointing": True}, None)],
)
def test_bf16_autocast_and_gradient_checkpointing(tmp_path, args, teacher_dtype):
    model = tiny_model("llama", gqa_ratio=1).train()
    callback = make_callback(DistillationConfig(alpha=0.5, teacher_dtype=teacher_dtype))
    trainer = train(tmp_path, model, callback, max_steps=8, **args)
    assert len(callback.reports) == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and "distill/kl" in trainer.state.log_history[0]


def sft_trainer(tmp_path, model, callback, **kwargs):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 128, (14,), generator=g)) for _ in range(32)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=8, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, logging_steps=2, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
                         max_length=16)  # fmt: skip
    return trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                          processing_class=tiny_tokenizer(), callbacks=[callback], **kwargs)  # fmt: skip


def test_sft_trainer_trains_on_the_distillation_loss(tmp_path):
    model = tiny_model("llama").train()
    callback = make_callback(DistillationConfig(alpha=0.5), target_ratio=0.8)
    trainer = sft_trainer(tmp_path, model, callback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(callback.reports) == 2 and all("mean_token_accuracy" in h and "distill/kl" in h for h in logs)
    assert all(h["loss"] == pytest.approx(0.5 * h["distill/ce"] + 0.5 * h["distill/kl"], rel=0.05) for h in logs)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (1, 4)  # TRL's forward is back
    assert callback._distiller.teacher is None


def test_sft_trainer_with_a_compute_loss_func_is_refused(tmp_path):
    """TRL trains on compute_loss_func(model(inputs without labels)) and runs a labelled forward under no_grad for
    its metrics: that forward must not count as distillation (it did, and the KL was logged but never trained)."""
    model = tiny_model("llama").train()
    own = {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.float().mean()}
    with pytest.warns(FutureWarning, match="compute_loss_func"), pytest.raises(RuntimeError, match="step 1 did not"):
        sft_trainer(tmp_path, model, make_callback(DistillationConfig(alpha=0.5), target_ratio=0.8), **own).train()


@pytest.mark.parametrize(
    "case",
    [
        "next run with the callback",
        *(pytest.param(c, marks=pytest.mark.slow) for c in ("failed Trainer dropped", "stop_distillation")),
    ],
)
def test_after_a_failed_run_the_next_trainer_trains_on_its_own_loss(tmp_path, case):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise MemoryError("out of memory")  # the run stops without on_train_end

    model = tiny_model("llama", gqa_ratio=3).train()
    with pytest.raises(MemoryError) as failure:  # its traceback holds the failed Trainer, as a notebook would
        train(tmp_path / "a", model, make_callback(), extra_callbacks=[Fail()])
    assert "forward" in model.__dict__  # the distilling forward is still installed
    callback = TrainerCallback()  # no distillation
    if case == "failed Trainer dropped":  # the distiller goes with it
        del failure
    elif case == "stop_distillation":  # while the failed Trainer lives (a notebook), the README's one call
        stop_distillation(model)
    else:
        callback = AdaptPrunerCallback(PrunerConfig(target_ratio=0.5, num_stages=1, importance_window=1, round_to=1))
    trainer = train(tmp_path / "b", model, callback, max_steps=2, logging_steps=1)
    assert "forward" not in model.__dict__ and "distill/kl" not in trainer.state.log_history[0]
    stock = type(model).forward(model, input_ids=DATA[0]["input_ids"][None], labels=DATA[0]["labels"][None]).loss
    torch.testing.assert_close(model(input_ids=DATA[0]["input_ids"][None], labels=DATA[0]["labels"][None]).loss, stock)


def test_checkpoints_hold_no_teacher_and_resume_needs_the_original(tmp_path):
    def run(folder, model, teacher=None, resume=None):
        callback = make_callback(teacher=teacher)
        train(folder, model.train(), callback, resume=resume, save_strategy="steps", save_steps=6)
        return model, callback

    full_model, _ = run(tmp_path / "a", tiny_model("mistral", gqa_ratio=3))
    checkpoint = tmp_path / "a" / "run" / "checkpoint-6"  # after event 1 (step 2), before event 2 (step 10)
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(load_pruned(checkpoint).state_dict())  # the student's tensors only
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(list(full_model.parameters()))
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["AdaptPrunerCallback"]
    assert state["attributes"]["teacher_signature"]["num_parameters"] == count_parameters(tiny_model("mistral"))
    assert state["args"]["distillation"]["alpha"] == 0.5

    with pytest.raises(ValueError, match="Pass the original model as teacher"):
        run(tmp_path / "b", load_pruned(checkpoint), resume=str(checkpoint))
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        run(tmp_path / "c", load_pruned(checkpoint), teacher=tiny_model("mistral", seed=1), resume=str(checkpoint))
    swapped = tiny_model("mistral", gqa_ratio=3)  # the original's weights, two layers in each other's place
    layers = swapped.get_decoder().layers
    layers[0], layers[1] = layers[1], layers[0]
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        run(tmp_path / "c", load_pruned(checkpoint), teacher=swapped, resume=str(checkpoint))
    original = tiny_model("mistral", gqa_ratio=3)  # loaded as it was when training started
    resumed_model, resumed = run(tmp_path / "d", load_pruned(checkpoint), teacher=original, resume=str(checkpoint))
    assert len(resumed.reports) == 1
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert resumed_model.config.pruned_layout[key] == full_model.config.pruned_layout[key]


@pytest.mark.parametrize(
    ("overrides", "trainer_kwargs", "error", "message"),
    [
        ({"label_smoothing_factor": 0.1}, {}, ValueError, "label_smoothing_factor"),
        ({}, {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean()},
         RuntimeError, "backward pass of step 1 did not go through the distillation loss"),
    ],
)  # fmt: skip
def test_losses_computed_outside_the_model_are_refused(tmp_path, overrides, trainer_kwargs, error, message):
    model = tiny_model("llama").train()
    with pytest.raises(error, match=message):
        train(tmp_path, model, make_callback(), trainer_kwargs=trainer_kwargs, **overrides)


def record_event_scores(callback):
    """Make `callback` record the largest Taylor score each prune event is given from the training gradients."""
    seen, scorer = [], callback._scorer

    def recording():
        if callback._scores is not None:
            seen.append(max(float(s.channels.abs().max()) for s in callback._scores))
        return scorer()

    callback._scorer = recording
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_alone_against_a_given_copy_of_the_model_is_refused_before_training(tmp_path, dtype):
    """The callback's own copy is a row of test_bad_inputs.py; a `teacher=` with the model's weights is refused too."""
    model = tiny_model("llama", gqa_ratio=3).train()
    given = tiny_model("llama", gqa_ratio=3).to(dtype)
    callback = make_callback(DistillationConfig(alpha=1.0, chunk_size=16), teacher=given)
    with pytest.raises(ValueError, match=r"alpha=1.0 trains on KL\(teacher \|\| student\) alone.*alpha below 1"):
        train(tmp_path, model, callback)
    assert callback.events_done == 0 and count_parameters(model) == count_parameters(tiny_model("llama", gqa_ratio=3))


@pytest.mark.parametrize("case", ["alpha 0.99", "another teacher", "calibration scores"])
def test_near_pure_kl_gets_real_scores_at_the_first_event(tmp_path, case):
    """The KL's gradient is zero while the student is the teacher; the first event must still be scored."""
    model = tiny_model("llama", gqa_ratio=3).train()
    alpha = 0.99 if case == "alpha 0.99" else 1.0
    teacher = tiny_model("llama", gqa_ratio=3, seed=1) if case == "another teacher" else None
    calibration = {"importance_source": "calibration", "calibration_data": calibration_blocks(n=8, seq_len=16)}
    callback = make_callback(DistillationConfig(alpha=alpha, chunk_size=16), teacher=teacher,
                             **(calibration if case == "calibration scores" else {}))  # fmt: skip
    seen = record_event_scores(callback)
    train(tmp_path, model, callback)
    assert len(callback.reports) == 2
    assert all(score > 0 for score in seen) and len(seen) == (0 if case == "calibration scores" else 2)


def test_an_event_with_no_gradient_signal_stops_instead_of_pruning_at_random(tmp_path):
    model = tiny_model("llama", gqa_ratio=3).train()
    callback = AdaptPrunerCallback(PrunerConfig(target_ratio=0.6, num_stages=2, importance_window=2, inner_steps=3))
    flat = {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum() * 0.0}
    with pytest.raises(RuntimeError, match="Every Taylor score of the 2 steps before prune event 1 is zero"):
        train(tmp_path, model, callback, trainer_kwargs=flat)
    assert count_parameters(model) == count_parameters(tiny_model("llama", gqa_ratio=3))
