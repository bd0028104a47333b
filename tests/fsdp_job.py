"""AdaptPrunerCallback on an FSDP2 (`fully_shard`) model: 2 processes (gloo), launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/fsdp_job.py OUTPUT {training,calibration,physical,distill}

On CPU neither the Trainer nor accelerate will shard with FSDP (accelerate picks DDP for a CPU run), so this job
shards the model itself and runs a short training loop that fires the Trainer's callback events through
transformers' own `CallbackHandler`, in the Trainer's order: the callback sees what it sees under a GPU Trainer
with `fsdp_config={"fsdp_version": 2}` (DTensor parameters, gradients and Adam state).

Writes OUTPUT/result.json on rank 0 (per-step mask checks, parameter counts after each event, the stage targets,
whether every rank chose the same units, losses), saves the model with `save_pruned` (called on every rank) and
the sharded model's logits on a fixed prompt. `distill` trains with a full (unsharded) teacher on every rank, as the
README asks for FSDP2, after checking that `alpha=1.0` with that teacher (the model's own weights) is refused.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig, PrunerConfig, save_pruned


sys.path.insert(0, str(Path(__file__).parent))
from distributed_job import PROMPT, masked_units_are_zero

from tiny_models import calibration_blocks, tiny_model, tiny_tokenizer


STEPS = 12


class Recorder(TrainerCallback):
    """After each step (this runs after AdaptPrunerCallback): masked weights still zero? After each event: the
    unmasked parameter count, and whether every rank holds the same layout."""

    def __init__(self, pruner_callback):
        self.pruner_callback = pruner_callback
        self.zero_after_every_step = True
        self.events = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        pruner = self.pruner_callback._pruner
        self.zero_after_every_step &= masked_units_are_zero(pruner, optimizer)  # collective
        if self.pruner_callback.events_done > len(self.events):
            layouts = [None] * dist.get_world_size()
            dist.all_gather_object(layouts, pruner.model.config.pruned_mask)
            self.events.append({"step": state.global_step, "params": pruner.num_parameters(), "mode": pruner.mode,
                                "same_on_every_rank": all(layout == layouts[0] for layout in layouts),
                                "refit_tokens": self.pruner_callback.reports[-1].reconstruction_tokens})  # fmt: skip


def main() -> None:
    output, source = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_model("llama", gqa_ratio=3, layers=3)  # same seed on every rank
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if source == "distill" else None  # unsharded
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    config = PrunerConfig(target_ratio=0.7, num_stages=2, importance_window=2, recovery_fraction=0.25, round_to=1,
                          amplitude=0.1, importance_source="calibration" if source == "calibration" else "training",
                          mode="physical" if source == "physical" else "auto", calibration_samples=8,
                          calibration_batch_size=4, reconstruction="least_squares")  # fmt: skip
    args = TrainingArguments(output_dir=str(output / "run"), max_steps=STEPS, use_cpu=True, ddp_backend="gloo",
                             report_to=[], disable_tqdm=True)  # fmt: skip
    refusal = None
    if teacher is not None:  # the teacher has the sharded model's weights: alpha=1.0 would score event 1 with zeros
        pure_kl = AdaptPrunerCallback(config, distillation=DistillationConfig(alpha=1.0), teacher=teacher)
        try:
            handler = CallbackHandler([pure_kl], model, None, optimizer, None)
            handler.on_train_begin(args, TrainerState(max_steps=STEPS), TrainerControl())
        except ValueError as error:
            refusal = str(error)
    distillation = DistillationConfig(alpha=0.5) if teacher is not None else None
    callback = AdaptPrunerCallback(config, calibration_data=calibration_blocks(n=16, seq_len=16),
                                   distillation=distillation, teacher=teacher)  # fmt: skip
    recorder = Recorder(callback)
    handler = CallbackHandler([callback, recorder], model, None, optimizer, None)
    state, control = TrainerState(max_steps=STEPS), TrainerControl()

    data = calibration_blocks(n=64, seq_len=16)
    losses, distill_logs = [], []
    model.train()
    handler.on_train_begin(args, state, control)
    for step in range(STEPS):
        batch = data[(step * world_size + rank) * 2 :][:2]  # each rank its own batch, as a distributed sampler
        handler.on_step_begin(args, state, control)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        handler.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        handler.on_optimizer_step(args, state, control)
        optimizer.zero_grad()
        state.global_step += 1
        handler.on_step_end(args, state, control)
        logs = {"loss": losses[-1]}
        handler.on_log(args, state, control, logs)  # as the Trainer logs a training step (logging_steps=1)
        distill_logs.append({k: v for k, v in logs.items() if k.startswith("distill/")})
    handler.on_train_end(args, state, control)

    model.eval()
    with torch.no_grad():
        logits = model(PROMPT).logits  # the sharded, masked model (every rank runs the forward)
    save_pruned(model, output / "final", tiny_tokenizer())  # every rank calls it; rank 0 gathers and writes
    if rank == 0:
        torch.save(logits, output / "logits.pt")
        result = {
            "events": recorder.events,
            "zero_after_every_step": recorder.zero_after_every_step,
            "targets": [s.target_params for s in callback.schedule],
            "params": callback._pruner.num_parameters(),
            "losses": losses,
            "distill_logs": distill_logs,
            "refusal": refusal,
            "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else None,
            "teacher_frozen": teacher is not None and not any(p.requires_grad for p in teacher.parameters()),
        }
        (output / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
