"""The Trainer's checkpoints of a pruning run.

A checkpoint of a pruned model does not fit the unpruned model: loading it into that gives an error that says what to
do (`refuse_mismatched_checkpoints`). A LoRA run's checkpoints carry more than the adapter: the Trainer saves a
`PeftModel` as its adapter only; the pruned base weights the adapter belongs to are written beside it, in
`checkpoint-N/pruned_base/`, so that the run can resume: `PeftModel.from_pretrained(load_pruned(ckpt / "pruned_base"),
ckpt, is_trainable=True)`, then `trainer.train(resume_from_checkpoint=ckpt)`.

The Trainer writes a checkpoint's `config.json` itself, which carries the per-layer widths; the history of kept
indices goes to `pruning_history.json` beside it (`hf_adapt_pruner.history`), written here.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging

from .architectures import base_without_adapters, unwrap_peft
from .config import PrunerConfig
from .history import write_history
from .serialization import save_pruned
from .sharding import has_sharded_parameters


logger = logging.get_logger(__name__)

PRUNED_BASE_DIR = "pruned_base"
TRAINER_STATE_NAME = "trainer_state.json"  # as transformers.trainer names it (importing that loads the Trainer)


class PrunedBaseWriter:
    """Writes `pruning_history.json` into each checkpoint, and the pruned base into each checkpoint of a LoRA run,
    once: the callback forwards two Trainer events."""

    def __init__(self, config: PrunerConfig):
        self.config = config
        self._pushed_step: int | None = None  # written when this step's push began; on_save then skips it

    def on_push_begin(self, args, state, model) -> None:
        """With `hub_strategy` "checkpoint" or "all_checkpoints" the Trainer uploads each checkpoint (on rank 0 only)
        before `on_save`: write the pruned base (or the history) into it now, so that the pushed checkpoint can
        resume too."""
        if args.hub_strategy not in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            return
        checkpoint = _checkpoint_folder(args, state)
        if not _is_lora_run(model):
            _write_history(checkpoint, model)
            return
        if not checkpoint.is_dir():  # `trainer.push_to_hub()` after training pushes no checkpoint
            if state.is_hyper_param_search:
                logger.warning_once(f"This search trial's checkpoint folder was not found (no trainer_state.json "
                                    f"under {args.output_dir} holds its trial_params alone): its push lacks "
                                    "pruned_base/.")  # fmt: skip
            return
        if has_sharded_parameters(model):  # gathering the base is a collective: on_save does it, on every rank
            logger.warning_once("The pushed checkpoints of a sharded (FSDP) LoRA run lack pruned_base/: resume from "
                                "the local checkpoints.")  # fmt: skip
            return
        self._write(checkpoint, model)
        self._pushed_step = state.global_step

    def on_save(self, args, state, model) -> None:
        pushed, self._pushed_step = self._pushed_step, None  # cleared at each save: a later run saves afresh
        checkpoint = _checkpoint_folder(args, state)
        if not _is_lora_run(model):
            if state.is_world_process_zero:
                _write_history(checkpoint, model)
            return
        if pushed == state.global_step:
            return
        if state.is_world_process_zero and not checkpoint.is_dir():  # every rank goes on (FSDP2 gathers)
            logger.warning(f"No checkpoint folder {checkpoint} (a hyper-parameter search trial's was not found): the "
                           "pruned base goes there; move it beside the adapter's checkpoint to resume.")  # fmt: skip
        self._write(checkpoint, model)

    def _write(self, checkpoint: Path, model) -> None:
        save_pruned(base_without_adapters(model), checkpoint / PRUNED_BASE_DIR, overwrite=True,
                    pruner_config=self.config)  # fmt: skip


def _write_history(checkpoint: Path, model) -> None:
    """`pruning_history.json` beside the checkpoint's config.json (the Trainer wrote the weights and the config)."""
    if model is not None and checkpoint.is_dir() and (checkpoint / "config.json").is_file():
        write_history(model, checkpoint)


def refuse_mismatched_checkpoints(model: nn.Module) -> None:
    """Turn a size-mismatch traceback at `resume_from_checkpoint` into an error that says what to do."""

    def hook(module, state_dict, prefix, *args):
        shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        for key, value in state_dict.items():
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if name in shapes and hasattr(value, "shape") and tuple(value.shape) != shapes[name]:
                raise ValueError(
                    f"The checkpoint's {name} has shape {tuple(value.shape)} but the model's is {shapes[name]}: "
                    "the checkpoint comes from a pruned run. Resume with the checkpoint's model: "
                    "model = load_pruned(checkpoint) (or from_pretrained(checkpoint, trust_remote_code=True)), "
                    "then trainer.train(resume_from_checkpoint=checkpoint)."
                )

    model.register_load_state_dict_pre_hook(hook)


def _checkpoint_folder(args, state) -> Path:
    """The folder the Trainer has just saved into: `output_dir/checkpoint-N`, or for a hyper-parameter search trial
    `output_dir/<run>/checkpoint-N`, whose run name only the Trainer knows: the one whose saved state holds this
    trial's parameters (if exactly one does; otherwise `output_dir/checkpoint-N`, which then does not exist)."""
    folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if not getattr(state, "is_hyper_param_search", False):
        return folder
    params = json.loads(json.dumps(state.trial_params))  # as the Trainer wrote them
    found = [saved.parent for saved in Path(args.output_dir).glob(f"*/{folder.name}/{TRAINER_STATE_NAME}")
             if json.loads(saved.read_text()).get("trial_params") == params]  # fmt: skip
    return found[0] if len(found) == 1 else folder


def _is_lora_run(model) -> bool:
    return model is not None and unwrap_peft(model) is not model
