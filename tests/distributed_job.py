"""A 2-process Trainer run with AdaptPrunerCallback, launched by tests/test_distributed.py through torchrun (gloo).

    torchrun --nproc_per_node 2 tests/distributed_job.py OUTPUT {resume,mask,disagree,unattached,distill,uniform}

Writes OUTPUT/result.json on rank 0: whether parameters and optimizer state were bit-identical across ranks after
every prune event and at the end, the layouts, parameter counts, stage targets and losses; saves the final model with
`save_pruned` (called on every rank, written by rank 0) and its logits on a fixed prompt. `distill` trains with a
teacher on every rank (a frozen copy of the unpruned model), then resumes from the mid checkpoint with the original
model passed as teacher. `unattached` is the unchanged user script: the callback is passed in `callbacks=[...]` and
`callback.attach(trainer)` is never called. `uniform` distils with `PrunerConfig(layout="uniform")`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_adapt_pruner.pruner
from hf_adapt_pruner import (
    AdaptPrunerCallback,
    DistillationConfig,
    PrunerConfig,
    count_parameters,
    load_pruned,
    save_pruned,
)
from hf_adapt_pruner.sharding import full_tensor
from hf_adapt_pruner.surgery import kept_per_module


sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB, calibration_blocks, tiny_model, tiny_tokenizer


PROMPT = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))  # test_serialization.INPUT


def digest(model, optimizer) -> str:
    """A hash of every parameter and optimizer state tensor, bit for bit."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().numpy().tobytes())
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def identical_across_ranks(model, optimizer) -> bool:
    return same_on_every_rank(digest(model, optimizer))


def same_on_every_rank(value) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def masked_units_are_zero(pruner, optimizer=None) -> bool:
    """Mask mode: every weight of a masked head or channel is exactly zero, and with `optimizer` its state tensors
    shaped like the weight too (sharded tensors are gathered: then a collective)."""
    for lm in pruner.layers:
        if lm.live is None:
            continue
        for pruned, kept in kept_per_module(lm, pruner.head_dim, lm.live):
            weight = pruned.module.weight
            dropped = torch.ones(weight.shape[pruned.dim], dtype=torch.bool)
            dropped[kept] = False
            state = optimizer.state.get(weight, {}).values() if optimizer is not None else ()
            for tensor in (weight, *(v for v in state if v.shape == weight.shape)):
                if full_tensor(tensor.detach()).index_select(pruned.dim, dropped.nonzero().flatten()).count_nonzero():
                    return False
    return True


class Recorder(TrainerCallback):
    """After every prune event (this runs after AdaptPrunerCallback): are the replicas still identical? In mask
    mode, after every step: are the masked weights still zero?"""

    def __init__(self, pruner_callback):
        self.pruner_callback = pruner_callback
        self.events_seen = 0
        self.checks = []
        self.masked_zero_every_step = True

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        pruner = self.pruner_callback._pruner
        if pruner.mode == "mask" and not masked_units_are_zero(pruner):
            self.masked_zero_every_step = False
        if self.pruner_callback.events_done > self.events_seen:
            self.events_seen = self.pruner_callback.events_done
            reports = self.pruner_callback.reports  # empty after a resume, until the next event
            self.checks.append({"step": state.global_step, "params": pruner.num_parameters(), "mode": pruner.mode,
                                "identical": identical_across_ranks(model, optimizer.optimizer),
                                "refit_tokens": reports[-1].reconstruction_tokens if reports else None})  # fmt: skip
            teacher = self.pruner_callback._distiller.teacher if self.pruner_callback._distiller else None
            if teacher is not None:  # one per rank, identical, frozen, not inside DDP's module
                ddp_modules = {id(m) for m in self.trainer.model_wrapped.modules()}
                self.checks[-1]["teacher"] = {
                    "params": count_parameters(teacher),
                    "identical": same_on_every_rank(digest(teacher, optimizer.optimizer)),
                    "frozen": not teacher.training
                    and all(not p.requires_grad and p.grad is None for p in teacher.parameters()),
                    "outside_ddp": not any(id(m) in ddp_modules for m in teacher.modules()),
                }  # fmt: skip


def train(model, output: Path, mode: str, resume: str | None = None, teacher=None):
    args = TrainingArguments(
        output_dir=str(output / "run"), max_steps=12, per_device_train_batch_size=2, learning_rate=1e-3,
        save_strategy="steps", save_steps=6, report_to=[], use_cpu=True, ddp_backend="gloo", seed=0,
        disable_tqdm=True, logging_steps=1, dataloader_drop_last=True,
    )  # fmt: skip
    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=64, seq_len=16)]
    config = PrunerConfig(target_ratio=0.7, num_stages=2, importance_window=2, recovery_fraction=0.25, round_to=1,
                          amplitude=0.02 if mode == "uniform" else 0.1, mode="mask" if mode == "mask" else "auto",
                          layout="uniform" if mode == "uniform" else "adaptive",
                          reconstruction="least_squares")  # fmt: skip
    distillation = DistillationConfig(alpha=0.5, temperature=2.0) if mode in ("distill", "uniform") else None
    callback = AdaptPrunerCallback(config, distillation=distillation, teacher=teacher)
    recorder = Recorder(callback)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, recorder])
    recorder.trainer = trainer  # its model_wrapped is the DDP wrapper once training runs
    if mode != "unattached":
        callback.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, recorder


def main() -> None:
    output, mode = Path(sys.argv[1]), sys.argv[2]
    model = tiny_model("llama", gqa_ratio=3, layers=3)
    if mode == "disagree" and int(os.environ.get("RANK", "0")) == 1:
        original = hf_adapt_pruner.pruner.select_top
        hf_adapt_pruner.pruner.select_top = lambda scores, k: original(-scores, k)  # rank 1 prefers the worst
    trainer, callback, recorder = train(model, output, mode)
    rank = dist.get_rank()
    result = {
        "checks": recorder.checks,
        "final_identical": identical_across_ranks(trainer.model, trainer.optimizer.optimizer),
        "masked_zero_every_step": recorder.masked_zero_every_step,
        "targets": [s.target_params for s in callback.schedule],
        "params": callback._pruner.num_parameters(),
        "layout": callback._pruner.layout.to_dict(),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "found_trainer": callback._trainer is not None and callback._trainer() is trainer,
        "first_callback": trainer.callback_handler.callbacks[0] is callback,
    }
    if mode == "distill":
        distill_logs = [{k: v for k, v in e.items() if k.startswith("distill/")} for e in trainer.state.log_history]
        result["distill_logs"] = [e for e in distill_logs if e]
        result["distill_logs_identical"] = same_on_every_rank(result["distill_logs"])
    if mode in ("resume", "distill"):
        resumed_model = load_pruned(output / "run" / "checkpoint-6")
        teacher = tiny_model("llama", gqa_ratio=3, layers=3) if mode == "distill" else None  # the original model
        resumed, _, _ = train(resumed_model, output, mode, resume=str(output / "run" / "checkpoint-6"),
                              teacher=teacher)  # fmt: skip
        result["resumed_layout"] = resumed.model.config.pruned_layout
        result["resumed_params"] = count_parameters(resumed.model)
    model = trainer.model.eval()
    save_pruned(model, output / "final", tiny_tokenizer())  # every rank calls it; only rank 0 writes
    if rank == 0:
        with torch.no_grad():
            torch.save(model(PROMPT).logits, output / "logits.pt")
        result["saved_params"] = count_parameters(load_pruned(output / "final"))
        events = json.loads((output / "run" / "prune_events.json").read_text())  # written by rank 0 only
        result["events_file"] = [[e["stage"], e["params"]] for e in events]
        (output / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
