"""The callback without `callback.attach(trainer)`: it finds the Trainer running it, or the DDP object around the
model, or falls back to masks with one warning. The 2-process runs (torchrun, accelerate launch) are in
tests/test_distributed.py; here one process drives the events, with `args.world_size` faked to 2 where the code
path depends on it (the engine itself syncs only through a real process group, which is absent or of size 1)."""

from __future__ import annotations

import contextlib
import logging
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig

from tiny_models import calibration_blocks, tiny_model


STEPS = 8
CONFIG = dict(target_ratio=0.7, num_stages=2, importance_window=2, recovery_fraction=0.25, round_to=1)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS, use_cpu=True, report_to=[],
                             disable_tqdm=True, **overrides)  # fmt: skip


def two_processes():
    """`args.world_size == 2` for the callback's decisions (no process is started)."""
    return mock.patch.object(TrainingArguments, "world_size", new_callable=mock.PropertyMock, return_value=2)


def custom_loop(args, callback, model, forward=None) -> list[float]:
    """A training loop without a Trainer that fires the Trainer's events through its `CallbackHandler`."""
    forward = forward or model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handler = CallbackHandler([callback], model, None, optimizer, None)
    state, control, data, losses = TrainerState(max_steps=STEPS), TrainerControl(), calibration_blocks(n=32), []
    handler.on_train_begin(args, state, control)
    for step in range(STEPS):
        batch = data[2 * step : 2 * step + 2]
        handler.on_step_begin(args, state, control)
        loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        del loss  # its graph holds the weights' gradient accumulators, with the shapes of before a prune event
        handler.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        handler.on_optimizer_step(args, state, control)
        optimizer.zero_grad()
        state.global_step += 1
        handler.on_step_end(args, state, control)
    handler.on_train_end(args, state, control)
    return losses


class LogRecorder(TrainerCallback):
    """Stands for a `report_to` integration: listed before the pruning callback, it records what `on_log` shows."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_the_callback_finds_its_trainer_and_goes_first(tmp_path):
    callback, recorder = AdaptPrunerCallback(PrunerConfig(**CONFIG)), LogRecorder()
    data = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=32)]
    args = arguments(tmp_path, per_device_train_batch_size=2, logging_steps=1, save_strategy="no")
    trainer = Trainer(model=tiny_model("llama").train(), args=args, train_dataset=data, callbacks=[recorder, callback])
    trainer.train()  # no callback.attach(trainer)
    assert callback._trainer() is trainer and trainer.callback_handler.callbacks[0] is callback
    seen = [logs["prune/params"] for logs in recorder.logs if "prune/params" in logs]
    assert seen == [report.params_after for report in callback.reports]  # the "integration" saw every event


def test_without_trainer_or_wrapper_masks_with_one_warning(tmp_path, caplog):
    model = tiny_model("llama").train()
    callback = AdaptPrunerCallback(PrunerConfig(**CONFIG))
    with two_processes(), caplog.at_level(logging.WARNING, logger="hf_adapt_pruner"):
        losses = custom_loop(arguments(tmp_path), callback, model)
    # transformers' own warnings reach caplog too when CI is set (its root logger propagates then): count ours only
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name.startswith("hf_adapt_pruner")]  # fmt: skip
    assert len(warnings) == 1 and "callback.attach(trainer)" in warnings[0] and "masks" in warnings[0]
    assert callback._pruner.mode == "mask" and len(callback.reports) == 2
    target = callback.schedule[-1].target_params
    assert abs(callback._pruner.num_parameters() - target) <= 0.01 * target
    assert all(torch.isfinite(torch.tensor(losses)))


def test_forced_physical_mode_without_a_wrapper_names_attach(tmp_path):
    callback = AdaptPrunerCallback(PrunerConfig(**CONFIG, mode="physical"))
    with two_processes(), pytest.raises(ValueError, match=r"call callback\.attach\(trainer\)"):
        custom_loop(arguments(tmp_path), callback, tiny_model("llama").train())


@contextlib.contextmanager
def one_process_group():
    """A gloo group of one process, so that a real `DistributedDataParallel` can wrap a model in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_ddp_wrapper_is_found_without_a_trainer(tmp_path):
    args = arguments(tmp_path)  # before the group: accelerate's process state must not see it
    model = tiny_model("llama").train()
    callback = AdaptPrunerCallback(PrunerConfig(**CONFIG))
    with one_process_group(), two_processes():
        ddp = DistributedDataParallel(model)
        losses = custom_loop(args, callback, model, forward=ddp)  # forwards through DDP, events see the model
    assert callback._pruner.mode == "physical" and callback._ddp is ddp  # its reducer was rebuilt at each event
    assert len(callback.reports) == 2 and all(torch.isfinite(torch.tensor(losses)))
    widths = [layer.mlp.gate_proj.weight.shape[0] for layer in ddp.module.model.layers]
    assert widths == model.config.pruned_layout["intermediate_size"]
