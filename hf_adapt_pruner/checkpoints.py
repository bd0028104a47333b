"""What a LoRA run's checkpoints carry besides the adapter.

The Trainer saves a `PeftModel` as its adapter only; the pruned base weights the adapter belongs to are written
beside it, in `checkpoint-N/pruned_base/`, so that the run can resume: `PeftModel.from_pretrained(load_pruned(ckpt /
"pruned_base"), ckpt, is_trainable=True)`, then `trainer.train(resume_from_checkpoint=ckpt)`.
"""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging

from .architectures import base_without_adapters, unwrap_peft
from .config import PrunerConfig
from .serialization import save_pruned
from .sharding import has_sharded_parameters


logger = logging.get_logger(__name__)

PRUNED_BASE_DIR = "pruned_base"


class PrunedBaseWriter:
    """Writes the pruned base into each checkpoint of a LoRA run, once: the callback forwards two Trainer events."""

    def __init__(self, config: PrunerConfig):
        self.config = config
        self._written_step: int | None = None

    def on_push_begin(self, args, state, model) -> None:
        """With `hub_strategy` "checkpoint" or "all_checkpoints" the Trainer uploads each checkpoint (on rank 0 only)
        before `on_save`: write the pruned base into it now, so that the pushed checkpoint can resume too."""
        checkpoint = _checkpoint_folder(args, state)
        if not _is_lora_run(model) or args.hub_strategy not in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            return
        if not checkpoint.is_dir():  # `trainer.push_to_hub()` after training pushes no checkpoint
            return
        if has_sharded_parameters(model):  # gathering the base is a collective: on_save does it, on every rank
            logger.warning_once("The pushed checkpoints of a sharded (FSDP) LoRA run lack pruned_base/: resume from "
                                "the local checkpoints.")  # fmt: skip
            return
        self._write(checkpoint, state, model)

    def on_save(self, args, state, model) -> None:
        checkpoint = _checkpoint_folder(args, state)
        if not _is_lora_run(model):
            return
        if state.is_world_process_zero and not checkpoint.is_dir():  # every rank goes on (FSDP2 gathers)
            logger.warning(f"No checkpoint folder {checkpoint} (a hyper-parameter search saves into run folders): the "
                           "pruned base goes there; move it beside the adapter's checkpoint to resume.")  # fmt: skip
        self._write(checkpoint, state, model)

    def _write(self, checkpoint: Path, state, model) -> None:
        if self._written_step == state.global_step:  # written when the push began (before on_save)
            return
        save_pruned(base_without_adapters(model), checkpoint / PRUNED_BASE_DIR, overwrite=True,
                    pruner_config=self.config)  # fmt: skip
        self._written_step = state.global_step


def _checkpoint_folder(args, state) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def _is_lora_run(model) -> bool:
    return model is not None and unwrap_peft(model) is not model
