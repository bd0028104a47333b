"""AdaptPrunerCallback inside an unmodified transformers.Trainer (tiny models)."""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig, count_parameters, load_pruned, pruning_history
from hf_adapt_pruner.importance import LayerSimilarityCollector
from hf_adapt_pruner.report import record_event
from hf_adapt_pruner.schedule import build_schedule

from tiny_models import calibration_blocks, tiny_model


DATA = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=64, seq_len=16, seed=5)]


def make_config(**overrides) -> PrunerConfig:
    values = dict(target_ratio=0.6, num_stages=3, importance_window=2, inner_steps=3, round_to=1,
                  min_intermediate_size=1)  # fmt: skip
    values.update(overrides)
    return PrunerConfig(**values)


def make_trainer(tmp_path, model, callback, max_steps=30, **args_overrides):
    args = dict(output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=4, report_to=[],
                use_cpu=True, logging_steps=5, save_strategy="no", learning_rate=1e-3, seed=0,
                disable_tqdm=True)  # fmt: skip
    args.update(args_overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=DATA, callbacks=[callback])
    return callback.attach(trainer) and trainer


def test_schedule_worked_example():
    config = PrunerConfig(target_ratio=0.7, num_stages=5, importance_window=8, recovery_fraction=0.1)
    stages = build_schedule(config, max_steps=1000, start_params=134_515_008, final_target=94_160_506)
    assert [s.step for s in stages] == [8, 97, 276, 543, 900]
    assert stages[-1].target_params == 94_160_506
    constant = build_schedule(PrunerConfig(target_ratio=0.5, num_stages=3, importance_window=10, data_split="constant",
                                           recovery_fraction=0.0), 110, 1000, 500)  # fmt: skip
    assert [s.step for s in constant] == [10, 60, 110] and [s.target_params for s in constant] == [833, 667, 500]
    cosine = build_schedule(make_config(data_split="cosine", num_stages=4), 100, 1000, 600)
    assert [s.step for s in cosine] == sorted({s.step for s in cosine})


@pytest.mark.parametrize("split", ["linear", "constant", "cosine"])
def test_schedule_error_names_the_fewest_steps_that_fit(split):
    """The default 10 events with linear shares need 34 steps, not importance_window + 10 + recovery (20)."""
    config = PrunerConfig(target_ratio=0.7, data_split=split)
    with pytest.raises(ValueError, match=r"Train for at least (\d+) steps") as error:
        build_schedule(config, 15, 1000, 700)
    needed = int(re.search(r"at least (\d+) steps", str(error.value)).group(1))
    assert len(build_schedule(config, needed, 1000, 700)) == config.num_stages == 10
    with pytest.raises(ValueError, match=f"max_steps={needed - 1}:"):
        build_schedule(config, needed - 1, 1000, 700)
    if split == "linear":
        assert needed == 34


@pytest.mark.parametrize("source", ["training", "calibration"])
def test_events_fire_on_schedule_and_hit_stage_targets(tmp_path, source):
    model = tiny_model("qwen2", gqa_ratio=3).train()
    callback = AdaptPrunerCallback(make_config(importance_source=source, calibration_samples=8), calibration_blocks())
    trainer = make_trainer(tmp_path, model, callback)
    trainer.train()
    steps = [s.step for s in callback.schedule]
    assert steps[0] == (2 if source == "training" else 0)
    logged = [h for h in trainer.state.log_history if "prune/stage" in h]
    assert [h["prune/step"] for h in logged] == steps
    assert all(h["step"] == h["prune/step"] for h in logged if h["prune/step"] > 0)  # logged at the event's step
    for stage, report, entry in zip(callback.schedule, callback.reports, logged):
        assert abs(report.params_after - stage.target_params) / stage.target_params <= 0.005
        assert entry["prune/params"] == report.params_after and entry["prune/stage_target"] == stage.target_params
    assert count_parameters(model) == callback.reports[-1].params_after
    layout = model.config.pruned_layout
    assert all(h % kv == 0 for h, kv in zip(layout["num_attention_heads"], layout["num_key_value_heads"]))
    assert len(pruning_history(model)) == 3 and "history" not in layout  # the history is not in config.json


def test_pruned_layers_keep_training_and_optimizer_state_matches(tmp_path):
    model = tiny_model("llama", gqa_ratio=3).train()
    callback = AdaptPrunerCallback(make_config())
    trainer = make_trainer(tmp_path, model, callback, max_steps=20)
    snapshots = {}

    class Spy(AdaptPrunerCallback.__mro__[1]):  # a plain TrainerCallback that watches after each prune event
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == callback.schedule[0].step + 1:
                snapshots["q"] = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
            if state.global_step == callback.schedule[0].step + 2:
                snapshots["moved"] = not torch.equal(snapshots["q"], model.model.layers[1].self_attn.q_proj.weight)
                torch_optimizer = getattr(optimizer, "optimizer", optimizer)
                snapshots["shapes_ok"] = all(
                    torch_optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters() if p.requires_grad
                )

    trainer.add_callback(Spy())
    trainer.train()
    assert snapshots["moved"] and snapshots["shapes_ok"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    model = tiny_model("llama", gqa_ratio=1).train()
    callback = AdaptPrunerCallback(make_config(num_stages=2))
    trainer = make_trainer(tmp_path, model, callback, max_steps=12, activation_checkpointing=True, bf16=True)
    trainer.train()
    assert len(callback.reports) == 2
    assert abs(count_parameters(model) - callback.schedule[-1].target_params) / count_parameters(model) <= 0.005


def test_layer_similarity_is_not_double_counted_under_gradient_checkpointing():
    counts = []
    for checkpointing in (False, True):
        model = tiny_model("llama").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        batch = calibration_blocks(n=2, seq_len=8)
        with LayerSimilarityCollector(list(model.model.layers), "cosine") as collector:
            model(batch, labels=batch).loss.backward()
        counts.append(collector.counts.tolist())
    assert counts[0] == counts[1] == [16.0, 16.0, 16.0]


def test_checkpoints_load_and_resume_matches_an_uninterrupted_run(tmp_path):
    def run(folder, resume_from=None):
        model = load_pruned(resume_from) if resume_from else tiny_model("mistral", gqa_ratio=3).train()
        callback = AdaptPrunerCallback(make_config())
        trainer = make_trainer(folder, model.train(), callback, save_strategy="steps", save_steps=6)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        return model, callback

    full_model, full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "run" / "checkpoint-6"  # after event 1 (step 2), before event 2 (step 10)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    after_first_event = [layer.after.intermediate_size for layer in full.reports[0].layers]
    assert loaded.config.pruned_layout["intermediate_size"] == after_first_event
    assert count_parameters(loaded) == full.reports[0].params_after
    resumed_model, resumed = run(tmp_path / "b", resume_from=checkpoint)
    assert [s.to_dict() for s in resumed.schedule] == [s.to_dict() for s in full.schedule]
    assert len(resumed.reports) == 2  # only the events after the checkpoint ran again
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert resumed_model.config.pruned_layout[key] == full_model.config.pruned_layout[key]
    state = json.loads((tmp_path / "a" / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["AdaptPrunerCallback"]["attributes"]["events_done"] == 1


def test_resuming_with_the_unpruned_model_gives_a_clear_error(tmp_path):
    model = tiny_model("llama").train()
    trainer = make_trainer(tmp_path, model, AdaptPrunerCallback(make_config()), save_strategy="steps", save_steps=6)
    trainer.train()
    fresh = tiny_model("llama").train()
    again = make_trainer(tmp_path / "again", fresh, AdaptPrunerCallback(make_config()))
    with pytest.raises(ValueError, match="load_pruned"):
        again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))


def test_logs_are_scalars_and_per_layer_data_goes_to_the_events_file(tmp_path):
    model = tiny_model("llama", gqa_ratio=3).train()
    callback = AdaptPrunerCallback(make_config())
    trainer = make_trainer(tmp_path, model, callback, logging_steps=1)
    trainer.train()
    assert all(isinstance(v, (int, float)) for entry in trainer.state.log_history for v in entry.values())
    events = json.loads((tmp_path / "run" / "prune_events.json").read_text())
    assert [e["step"] for e in events] == [s.step for s in callback.schedule] and [e["stage"] for e in events] == [
        1,
        2,
        3,
    ]
    for event, report in zip(events, callback.reports):  # the widths after each event, one entry per layer
        assert event["params"] == report.params_after and event["params_before"] == report.params_before
        assert event["num_attention_heads"] == [layer.after.num_attention_heads for layer in report.layers]
        assert event["num_key_value_heads"] == [layer.after.num_key_value_heads for layer in report.layers]
        assert event["intermediate_size"] == [layer.after.intermediate_size for layer in report.layers]
        assert event["layer_importance"] == pytest.approx(report.layer_importance, abs=1e-6)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert events[-1][key] == model.config.pruned_layout[key]  # the trained model's layout
    assert len(events[0]["num_attention_heads"]) == model.config.num_hidden_layers


def test_the_events_file_restarts_with_a_new_run_and_continues_a_resumed_one(tmp_path):
    def stages():
        return [(e["stage"], e["run"]) for e in json.loads((tmp_path / "prune_events.json").read_text())]

    for stage in (1, 2, 3):
        record_event(tmp_path, {"stage": stage, "run": "first"})
    record_event(tmp_path, {"stage": 2, "run": "resumed"})  # resumed from a checkpoint after stage 1
    assert stages() == [(1, "first"), (2, "resumed")]
    record_event(tmp_path, {"stage": 1, "run": "new"})  # a new run in the same output_dir
    assert stages() == [(1, "new")] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_other_ranks_write_no_events_file(tmp_path):
    callback = AdaptPrunerCallback(make_config(num_stages=2))
    with mock.patch.object(Trainer, "is_world_process_zero", return_value=False):  # as on rank 1
        trainer = make_trainer(tmp_path, tiny_model("llama").train(), callback, max_steps=12)
        trainer.train()
    assert len(callback.reports) == 2 and not (tmp_path / "run" / "prune_events.json").exists()
    assert [h["prune/stage"] for h in trainer.state.log_history if "prune/stage" in h] == [1, 2]  # logs as usual


def test_tensorboard_gets_the_scalars_and_a_table_per_event(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = AdaptPrunerCallback(make_config(num_stages=2))
    Trainer(model=tiny_model("llama").train(), train_dataset=DATA, callbacks=[callback],
            args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                                   report_to=["tensorboard"], use_cpu=True, logging_steps=5, save_strategy="no",
                                   disable_tqdm=True)).train()  # fmt: skip
    runs = [p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(runs[0]), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    steps = [s.step for s in callback.schedule]
    assert [e.step for e in events.Scalars("train/prune/params")] == steps  # the callback runs first, unattached
    tables = events.Tensors("prune/layers/text_summary")
    assert [t.step for t in tables] == steps
    assert "| layer | importance | heads | kv heads | intermediate |" in tables[-1].tensor_proto.string_val[0].decode()
