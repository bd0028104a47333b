"""`AdaptPrunerCallback`: Adapt-Accel (incremental pruning interleaved with training) in an unmodified Trainer.

The callback holds no algorithm: it turns Trainer events into engine calls (`AdaptivePruner`, scorers, schedule).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .calibration import calibration_pool, prepared_calibration
from .checkpoints import PrunedBaseWriter, refuse_mismatched_checkpoints
from .checks import check_optimizer, torch_optimizer, vocabulary_size
from .config import PrunerConfig
from .data import CalibrationData, CalibrationPool
from .distillation import DistillationConfig, Distiller, check_training_args, stop_distillation
from .distributed import ddp_mode, find_ddp_wrapper, rebuild_ddp_reducer, running_trainer
from .importance import GroupScores, LayerSimilarityCollector, group_scores
from .pruner import AdaptivePruner
from .reconstruction import GramStatistics
from .report import PruneReport, TensorBoardTables, record_event
from .schedule import Stage, build_schedule
from .scorers import CalibrationScorer, StaticScorer
from .sharding import has_sharded_parameters


logger = logging.get_logger(__name__)


class AdaptPrunerCallback(TrainerCallback, ExportableState):
    """Prunes the model in `config.num_stages` events while an ordinary `transformers.Trainer` trains it.

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[AdaptPrunerCallback(PrunerConfig(target_ratio=0.7, num_stages=5))])
    trainer.train()
    ```

    The schedule (see `hf_adapt_pruner.schedule`) is computed in `on_train_begin` from `max_steps`; everything is
    validated there, before the first step. By default (`importance_source="training"`) importance costs no extra
    passes: Taylor scores |w * grad| accumulate from the gradients the Trainer already computed (read in
    `on_pre_optimizer_step`, after clipping, before the step) over the `importance_window` steps before each event,
    and layer similarity comes from forward hooks that exist only in that window. With
    `importance_source="calibration"` each event runs the paper's forward/backward passes over `calibration_data`
    (any form `prune_model` takes; text is tokenized with `tokenizer`, else with the Trainer's `processing_class`).

    Each event slices weights in place (same `nn.Parameter` objects) and the optimizer's state with them, so the LR
    schedule, gradient accumulation and the optimizer carry on. Scalar event statistics (`prune/*`) go to the
    Trainer's logs; per-layer widths and importances to `prune_events.json` in `args.output_dir`.

    No call beyond `callbacks=[...]` is needed, in one process or several: in `on_train_begin` the callback finds the
    Trainer running it (on the call stack, see `hf_adapt_pruner.distributed.running_trainer`), moves itself to the
    front of its callback list (so `report_to` integrations see the `prune/*` values) and reads its DDP wrapper.
    `callback.attach(trainer)` does the same explicitly.

    With `distillation=DistillationConfig(...)` the model trains on `(1 - alpha) * CE + alpha * T^2 * KL(teacher ||
    student)` (see `hf_adapt_pruner.distillation`); the teacher is `teacher`, or a frozen copy of the model taken in
    `on_train_begin`, before any pruning. `distill/ce` and `distill/kl` join the Trainer's logs.

    Resuming: load the checkpoint's pruned model (`load_pruned(ckpt)` or `from_pretrained(ckpt,
    trust_remote_code=True)`), build the Trainer with the same callback config and call
    `trainer.train(resume_from_checkpoint=ckpt)`; the stored schedule continues where it stopped. With distillation,
    pass the original model as `teacher` (it is checked against the teacher the run started with). A LoRA run's
    checkpoint holds the adapter (the Trainer's) and the pruned base in `pruned_base/` (this callback's): resume
    with `PeftModel.from_pretrained(load_pruned(ckpt / "pruned_base"), ckpt, is_trainable=True)`.
    """

    def __init__(
        self,
        config: PrunerConfig | dict,
        calibration_data: CalibrationData | None = None,
        distillation: DistillationConfig | dict | None = None,
        teacher: torch.nn.Module | None = None,
        tokenizer: Any = None,
    ):
        if not isinstance(config, (PrunerConfig, dict)):
            raise TypeError(
                f"config={config!r} is a {type(config).__name__}: pass a PrunerConfig (or its to_dict()), e.g. "
                "AdaptPrunerCallback(PrunerConfig(target_ratio=0.7, num_stages=5))."
            )
        self.config = config if isinstance(config, PrunerConfig) else PrunerConfig.from_dict(config)
        self._calibration_waits = False  # text waiting for the Trainer's tokenizer (processing_class)
        if calibration_data is not None:  # read once (DataLoaders, generators); token ids checked at on_train_begin
            calibration_data, self._calibration_waits = prepared_calibration(calibration_data, self.config, tokenizer)
            if not self._calibration_waits:
                CalibrationPool(calibration_data, 1, 1, 0)
            if self.config.importance_source != "calibration":
                logger.warning(
                    "calibration_data is ignored with importance_source='training' (scores come from the Trainer's "
                    "gradients); set importance_source='calibration' to score on it."
                )
        self.calibration_data = calibration_data
        if isinstance(distillation, dict):
            distillation = DistillationConfig.from_dict(distillation)
        if teacher is not None and distillation is None:
            raise ValueError("A teacher without distillation: pass distillation=DistillationConfig(...) too.")
        self._distiller = Distiller(distillation, teacher) if distillation is not None else None
        self.teacher_signature: dict | None = None
        self.schedule: list[Stage] = []
        self.events_done = 0
        self.reports: list[PruneReport] = []
        self._pruner: AdaptivePruner | None = None
        self._collector: LayerSimilarityCollector | None = None
        self._scores: list[GroupScores] | None = None
        self._grams: GramStatistics | None = None  # inputs of o_proj / down_proj in the window, for reconstruction
        self._pending_logs: dict[str, Any] = {}
        self._tables = TensorBoardTables()  # per-layer tables of the events, sent in on_log
        self._hooked_model = None
        self._progress = True
        self._trainer = None  # weak reference, set by attach()
        self._ddp: DistributedDataParallel | None = None  # rebuilt after each event in multi-process runs
        self._pruned_base = PrunedBaseWriter(self.config)

    # --- ExportableState: the schedule survives a resume ------------------------------------------------------
    def state(self) -> dict:
        distillation = self._distiller.config.to_dict() if self._distiller else None
        return {
            "args": {"config": self.config.to_dict(), "distillation": distillation},
            "attributes": {"schedule": [s.to_dict() for s in self.schedule], "events_done": self.events_done,
                           "teacher_signature": self.teacher_signature},
        }  # fmt: skip

    def attach(self, trainer) -> AdaptPrunerCallback:
        """Put this callback first in `trainer`'s list, so its statistics reach `report_to` integrations too, and let
        it reach the Trainer's DDP wrapper in multi-process runs. Optional: `on_train_begin` does it by itself when it
        finds the Trainer that runs it (always, under `Trainer.train`).

        Safe while the handler iterates over its list (as in `on_train_begin`): moving the callback from index i to
        the front shifts only the entries before i, which have run already; the next index still holds the next one.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._trainer = weakref.ref(trainer)
        return self

    # --- set-up ---------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._guard_checkpoint_loading(model)

    def _tokenize_calibration(self, processing_class) -> None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a multimodal processor holds one
        if tokenizer is None:
            raise ValueError(
                "calibration_data holds text, and no tokenizer reached the callback: pass AdaptPrunerCallback(config, "
                "calibration_data=texts, tokenizer=tokenizer), or Trainer(..., processing_class=tokenizer)."
            )
        self.calibration_data, self._calibration_waits = prepared_calibration(self.calibration_data, self.config,
                                                                              tokenizer)  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._trainer is None or self._trainer() is None:
            trainer = running_trainer(self)  # the Trainer calling us: as if the user had called attach(trainer)
            if trainer is not None:
                self.attach(trainer)
        mode = self._resolve_mode(args, state, model)
        check_optimizer(optimizer)
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end=True cannot work with pruning (the best checkpoint may have another size): "
                "turn it off and load the checkpoint you want with load_pruned(checkpoint) after training."
            )
        if self.config.importance_source == "calibration" and self.calibration_data is None:
            raise ValueError(
                "importance_source='calibration' needs calibration data: AdaptPrunerCallback(config, "
                "calibration_data=token_blocks(...)), or use importance_source='training'."
            )
        if self._calibration_waits:
            self._tokenize_calibration(kwargs.get("processing_class"))
        if self.calibration_data is not None:  # token ids the model's embedding cannot look up
            CalibrationPool(self.calibration_data, 1, 1, 0, vocab_size=vocabulary_size(model))
        self._guard_checkpoint_loading(model)
        self._progress = not args.disable_tqdm
        self._pruner = AdaptivePruner(model, self.config, mode)  # unsupported model types fail here
        frozen = [p.path for lm in self._pruner.layers[:1] for p in lm.pruned if not p.module.weight.requires_grad]
        if self.config.importance_source == "training" and self.config.group_importance == "taylor" and frozen:
            raise ValueError(
                f"importance_source='training' reads the gradients of the pruned weights, but {frozen[0]} is frozen "
                "(as under LoRA). Use importance_source='calibration' with calibration_data, which computes them on "
                "calibration batches at each event."
            )
        self._restore_or_build_schedule(state)
        if self.schedule:
            self._pruner.check_target(self.schedule[-1].target_params)
        events = ", ".join(f"step {s.step} -> {s.target_params:,}" for s in self.schedule)
        logger.info(f"Adapt-Accel schedule: {events}")
        if self._distiller is not None:
            self._start_distillation(args, state, model)  # before an event at step 0: the teacher is unpruned
        else:
            stop_distillation(model)  # left on the model by a run that stopped with an exception
        if self.events_done < len(self.schedule) and self.schedule[self.events_done].step <= state.global_step:
            self._prune(args, state, optimizer)  # an event at step 0 (calibration-based importance)
        self._update_window(state)

    def _resolve_mode(self, args, state, model) -> str | None:
        """physical or mask under DDP, where it depends on the wrapper (whose reducer physical pruning rebuilds after
        each event); None where `AdaptivePruner` decides from the config and the model (one process, FSDP2)."""
        self._ddp = None
        if args.world_size == 1 or has_sharded_parameters(model):
            return None
        trainer = self._trainer() if self._trainer is not None else None
        wrapped = trainer.model_wrapped if trainer is not None else find_ddp_wrapper(model)
        mode = ddp_mode(self.config.mode, wrapped, args.world_size, warn=state.is_world_process_zero)
        self._ddp = wrapped if mode == "physical" else None
        return mode

    def _stored_attributes(self, state) -> dict:
        """This callback's attributes in the checkpoint's trainer_state.json (empty for a fresh run)."""
        stored = (state.stateful_callbacks or {}).get(type(self).__name__, {})
        stored = stored[0] if isinstance(stored, list) else stored
        return stored.get("attributes", {}) if isinstance(stored, dict) else {}

    def _start_distillation(self, args, state, model) -> None:
        check_training_args(args)
        config, alpha = self.config, self._distiller.config.alpha
        taylor_from_training = config.importance_source == "training" and config.group_importance == "taylor"
        if alpha == 1.0 and taylor_from_training and self.events_done == 0 and self._distiller.is_copy_of(model):
            raise ValueError(
                "alpha=1.0 trains on KL(teacher || student) alone, and the teacher is the model itself until the "
                "first prune event: the KL and its gradient are zero there, so importance_source='training' would "
                "give the first event no Taylor scores and it would remove units at random. Use an alpha below 1 "
                "(e.g. 0.99: the first event is then scored by the cross-entropy term, whose weight does not change "
                "the ranking), or importance_source='calibration' with calibration_data."
            )
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        stored = self._stored_attributes(state).get("teacher_signature") if state.global_step > 0 else None
        self._distiller.start(model, autocast=autocast, resuming_at=state.global_step, stored_signature=stored)
        self.teacher_signature = self._distiller.signature

    def _restore_or_build_schedule(self, state) -> None:
        schedule = self._stored_attributes(state).get("schedule")
        if state.global_step > 0 and schedule:
            self.schedule = [Stage(**s) for s in schedule]
            self.events_done = sum(s.step <= state.global_step for s in self.schedule)
            expected = self.schedule[self.events_done - 1].target_params if self.events_done else None
            actual = self._pruner.num_parameters()
            if expected is not None and abs(actual - expected) > self.config.target_tolerance * expected:
                raise ValueError(
                    f"Resuming at step {state.global_step}, after {self.events_done} prune events, the model should "
                    f"have about {expected:,} parameters but has {actual:,}. Load the model from the checkpoint you "
                    "resume from (load_pruned(checkpoint)) before trainer.train(resume_from_checkpoint=checkpoint)."
                )
            return
        if state.global_step > 0:
            raise ValueError(
                f"Resuming at step {state.global_step} from a checkpoint without an AdaptPrunerCallback schedule: "
                "resume only runs that started with this callback."
            )
        start = self._pruner.num_parameters()
        original = self._pruner.layout.base["num_parameters"]
        self.schedule = build_schedule(self.config, state.max_steps, start, self._pruner.final_target(), original)
        self.events_done = 0

    def _guard_checkpoint_loading(self, model) -> None:
        if model is not None and model is not self._hooked_model:
            refuse_mismatched_checkpoints(model)
            self._hooked_model = model

    # --- importance window ------------------------------------------------------------------------------------
    def _next_stage(self) -> Stage | None:
        return self.schedule[self.events_done] if self.events_done < len(self.schedule) else None

    def _update_window(self, state) -> None:
        """Open the window `importance_window` steps before the next event (training-based importance only)."""
        stage = self._next_stage()
        in_window = (
            self.config.importance_source == "training"
            and stage is not None
            and stage.step - self.config.importance_window <= state.global_step < stage.step
        )
        if in_window and self._collector is None:
            layers = [lm.layer for lm in self._pruner.layers]
            self._collector = LayerSimilarityCollector(layers, self.config.layer_importance).__enter__()
            self._scores = None
            if self.config.refits(while_training=True):  # the window's training inputs, for the event's refit
                self._grams = GramStatistics(self._pruner.layers).__enter__()
        elif not in_window:
            self._close_window()

    def _close_window(self) -> None:
        """Remove the forward hooks; the accumulated Taylor scores are kept until the event uses them."""
        if self._collector is not None:
            self._collector.__exit__(None, None, None)
            self._collector = None
        if self._grams is not None:
            self._grams.__exit__(None, None, None)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._collector is None or self.config.group_importance != "taylor":
            return
        step_scores = [group_scores(lm, self._pruner.head_dim, "taylor") for lm in self._pruner.layers]
        self._scores = step_scores if self._scores is None else [a + b for a, b in zip(self._scores, step_scores)]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._pruner is not None and self._pruner.mode == "mask":
            self._pruner.reapply_masks(torch_optimizer(optimizer))  # masked weights stay exactly zero

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self._distiller is not None and self._distiller.active:
            self._distiller.check_step(state.global_step)
        stage = self._next_stage()
        if stage is not None and state.global_step >= stage.step:
            self._prune(args, state, optimizer)
            control.should_log = True
        self._update_window(state)
        return control

    # --- the prune event --------------------------------------------------------------------------------------
    def _scorer(self):
        config, pruner = self.config, self._pruner
        if config.importance_source == "calibration":
            pool = calibration_pool(self.calibration_data, config, seed=config.seed + self.events_done)
            return CalibrationScorer.from_config(
                pruner.model, pool, config, progress=self._progress, while_training=True
            )
        importance = self._collector.importance()
        if config.group_importance == "taylor":
            if self._scores is None:
                raise RuntimeError("No gradients were seen in the importance window before the prune event.")
            if not any(t.any() for s in self._scores for t in (s.q_heads, s.kv_heads, s.channels)):
                raise RuntimeError(
                    f"Every Taylor score of the {config.importance_window} steps before prune event "
                    f"{self.events_done + 1} is zero: the training loss had no gradient for the pruned weights (a "
                    "loss already at its minimum, such as a KL against a teacher that is the model itself), so the "
                    "event could only remove units at random. Score on calibration_data with "
                    "importance_source='calibration', or train on a loss with a gradient."
                )
            scores = self._scores
        else:
            generator = torch.Generator().manual_seed(config.seed + self.events_done)
            scores = [group_scores(lm, pruner.head_dim, config.group_importance, generator) for lm in pruner.layers]
        return StaticScorer(importance, scores, self._grams)

    def _prune(self, args, state, optimizer) -> None:
        stage = self._next_stage()
        report = self._pruner.prune_to(
            stage.target_params, self._scorer(), optimizer=torch_optimizer(optimizer), progress=False
        )
        if self._ddp is not None:
            rebuild_ddp_reducer(self._ddp)
        self._close_window()
        self._scores = self._grams = None
        self.events_done += 1
        self.reports.append(report)
        self._publish(args, state, stage, report)

    def _publish(self, args, state, stage: Stage, report: PruneReport) -> None:
        """Scalars to the Trainer's logs (the console and `log_history` show only those well); per-layer widths and
        importances to `prune_events.json` in `output_dir` and to TensorBoard as a table (main process only)."""
        base = self._pruner.layout.base["num_parameters"]
        logger.info(
            f"prune event {stage.index}/{len(self.schedule)} at step {state.global_step}: "
            f"{report.params_before:,} -> {report.params_after:,} parameters ({report.params_after / base:.1%} of "
            f"the original; stage target {stage.target_params:,}) in {report.wall_time_s:.1f} s"
        )
        scalars = {"stage": stage.index, "step": state.global_step, "params": report.params_after,
                   "ratio": round(report.params_after / base, 6), "stage_target": stage.target_params,
                   "seconds": round(report.wall_time_s, 3)}  # fmt: skip
        self._pending_logs = {f"prune/{key}": value for key, value in scalars.items()}
        if not state.is_world_process_zero:
            return
        layout = self._pruner.layout
        record_event(args.output_dir, {
            **scalars, "params_before": report.params_before, "mode": self._pruner.mode,
            "num_attention_heads": list(layout.num_attention_heads),
            "num_key_value_heads": list(layout.num_key_value_heads),
            "intermediate_size": list(layout.intermediate_size),
            "layer_importance": [round(v, 6) for v in report.layer_importance],
            "sparsity": [round(v, 6) for v in layout.sparsity],
        })  # fmt: skip
        self._tables.add(self._trainer() if self._trainer is not None else None, state.global_step, report.table())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self._distiller is not None and self._distiller.active:
            self._pending_logs.update(self._distiller.pop_logs())  # a training log: every rank gets here
        self._tables.send(self._trainer() if self._trainer is not None else None)
        if not self._pending_logs or logs is None:
            return
        logs.update(self._pending_logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        self._pruned_base.on_push_begin(args, state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._pruned_base.on_save(args, state, model)  # a LoRA run's checkpoints: see hf_adapt_pruner.checkpoints

    def on_train_end(self, args, state, control, **kwargs):
        self._close_window()
        if self._distiller is not None:
            self._distiller.stop()
