"""Pruning a peft `PeftModel`: LoRA adapters are sliced with the layers they wrap and keep training."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_adapt_pruner import PrunerConfig, count_parameters, load_pruned, prune_model, pruning_history, save_pruned
from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.remote_code import base_model_type
from hf_adapt_pruner.surgery import prune_layer_

from tiny_models import VOCAB, calibration_blocks, tiny_model


INPUT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
CONFIG = PrunerConfig(target_ratio=0.7, amplitude=0.1, inner_steps=3, calibration_samples=8, round_to=1)
# the callback on a LoRA run: scores from calibration batches (the base weights get no gradients)
CALLBACK_CONFIG = PrunerConfig(target_ratio=0.8, num_stages=2, importance_source="calibration", inner_steps=2,
                               calibration_samples=8, round_to=1)  # fmt: skip


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def lora_model(model_type: str) -> PeftModel:
    """LoRA on every linear layer, with non-zero B so the adapters change the output."""
    model = get_peft_model(
        tiny_model(model_type, gqa_ratio=3), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model.eval()


def replay(model, layout: dict, history: list) -> None:
    """Prune `model` (a plain transformers model) with the kept indices recorded in `history`."""
    layers = layer_modules(model, get_architecture(base_model_type(model.config.model_type)))
    for event in history:
        for index, kept in event["layers"].items():
            keep = (torch.tensor(kept[k]) for k in ("q_heads", "kv_heads", "channels"))
            prune_layer_(layers[int(index)], layout["head_dim"], *keep)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "olmo2"])  # plain, fused projections, full-width norms
def test_merge_after_pruning_equals_pruning_the_merged_model(model_type):
    peft_model = lora_model(model_type)
    reference = copy.deepcopy(peft_model)
    # the replay below slices only: the refit's LoRA handling is tested in test_reconstruction.py
    prune_model(peft_model, dataclasses.replace(CONFIG, reconstruction="none"), calibration_blocks(), progress=False)
    layout, history = peft_model.config.pruned_layout, pruning_history(peft_model)
    for lm in layer_modules(peft_model, get_architecture(model_type)):
        for pruned in (p for p in lm.pruned if p.adapter is not None):  # OLMo 2's norms carry no adapter
            a, b = pruned.adapter.lora_A["default"], pruned.adapter.lora_B["default"]
            assert (b.out_features, a.in_features) == (pruned.module.out_features, pruned.module.in_features)
    pruned_logits = logits(peft_model)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), pruned_logits, atol=1e-5, rtol=0)

    merged_first = reference.merge_and_unload()
    replay(merged_first, layout, history)
    torch.testing.assert_close(logits(merged), logits(merged_first), atol=1e-5, rtol=0)
    assert count_parameters(merged) == count_parameters(merged_first)


def test_adapters_keep_training_after_pruning():
    torch.manual_seed(0)
    peft_model = lora_model("llama").train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = calibration_blocks(n=4, seq_len=16)

    def step() -> float:
        loss = peft_model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    for _ in range(2):
        step()
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    prune_model(peft_model, CONFIG, calibration_blocks(), optimizer=optimizer, progress=False)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if n in frozen)  # restored
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert optimizer.state[lora_b]["exp_avg"].shape == lora_b.shape  # Adam state sliced with the adapter
    before = lora_b.detach().clone()
    losses = [step() for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not torch.equal(lora_b, before)
    for name, param in peft_model.named_parameters():
        if name in frozen and param.shape == frozen[name].shape:
            assert torch.equal(param, frozen[name]), name  # base weights stay frozen


def test_adapter_and_pruned_base_save_and_load_separately(tmp_path):
    peft_model = lora_model("qwen2")
    prune_model(peft_model, CONFIG, calibration_blocks(), progress=False)
    expected = logits(peft_model)
    with pytest.raises(TypeError, match="merge_and_unload"):
        save_pruned(peft_model, tmp_path / "refused")
    peft_model.save_pretrained(tmp_path / "adapter")
    save_pruned(peft_model.unload(), tmp_path / "base")
    base = load_pruned(tmp_path / "base", attn_implementation="eager")  # the tiny model's: same arithmetic
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-6, rtol=0)


def test_training_importance_with_frozen_weights_is_refused_before_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback

    peft_model = lora_model("llama").train()
    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    callback = AdaptPrunerCallback(PrunerConfig(target_ratio=0.8, num_stages=2, importance_window=2))
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback])
    with pytest.raises(ValueError, match="importance_source='calibration'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_lora_training_with_calibration_importance_prunes_during_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback

    peft_model = lora_model("llama").train()
    params = count_parameters(peft_model)
    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=24)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)  # fmt: skip
    callback = AdaptPrunerCallback(CALLBACK_CONFIG, calibration_data=calibration_blocks(n=16, seed=3))
    Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert len(callback.reports) == 2
    assert abs(count_parameters(peft_model) - round(params * 0.8)) <= 0.01 * params
    assert torch.isfinite(logits(peft_model.eval())).all()


def test_distillation_on_a_lora_run_takes_the_merged_model_as_teacher(tmp_path):
    """The teacher copied from a LoRA run is the model as it computed at the start, adapters merged in: no adapter
    branches to run, and the fingerprint of the merged model (to resume with)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig
    from hf_adapt_pruner.teacher import same_teacher, teacher_signature

    peft_model = lora_model("llama")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected_logits = logits(peft_model)

    class TeacherProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                teacher = callback._distiller.teacher
                self.has_lora = any(hasattr(m, "lora_A") for m in teacher.modules())
                self.logits = logits(teacher)

    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
                             logging_steps=4)  # fmt: skip
    calibration = calibration_blocks(n=16, seed=3)
    callback = AdaptPrunerCallback(CALLBACK_CONFIG, calibration, distillation=DistillationConfig())
    probe = TeacherProbe()
    trainer = Trainer(model=peft_model.train(), args=args, train_dataset=data, callbacks=[callback, probe])
    trainer.train()
    assert not probe.has_lora
    torch.testing.assert_close(probe.logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert callback.teacher_signature["num_parameters"] == count_parameters(merged)
    assert same_teacher(callback.teacher_signature, teacher_signature(merged))
    assert len(callback.reports) == 2 and all("distill/kl" in h for h in trainer.state.log_history[:-1])


def test_a_pruning_lora_run_resumes_from_its_checkpoint_with_the_pruned_base(tmp_path):
    """The checkpoint holds the adapter (the Trainer's) and the pruned base (the callback's, in pruned_base/); with
    distillation, the plain original is the teacher to resume with (the teacher was the model with new adapters)."""
    from transformers import Trainer, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig

    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=24)]

    def run(folder, model, resume=None, teacher=None):
        args = TrainingArguments(output_dir=str(folder), max_steps=12, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="steps", save_steps=6, use_cpu=True, disable_tqdm=True,
                                 learning_rate=1e-3, seed=0)  # fmt: skip
        callback = AdaptPrunerCallback(CALLBACK_CONFIG, calibration_blocks(n=16, seed=3),
                                       distillation=DistillationConfig(), teacher=teacher)  # fmt: skip
        Trainer(model=model.train(), args=args, train_dataset=data, callbacks=[callback]).train(resume)
        return callback

    def new_lora_model():
        return get_peft_model(tiny_model("llama", gqa_ratio=3), LoraConfig(r=4, target_modules="all-linear"))

    full_model = new_lora_model()
    full = run(tmp_path / "a", full_model)
    checkpoint = tmp_path / "a" / "checkpoint-6"  # after the event at step 0, before the one at step 11
    assert [r.step for r in full.schedule] == [0, 11]
    base = load_pruned(checkpoint / "pruned_base")
    first_event = json.loads((tmp_path / "a" / "prune_events.json").read_text())[0]
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert base.config.pruned_layout[key] == first_event[key]
    assert not any(hasattr(m, "lora_A") for m in base.modules())
    assert any(hasattr(m, "lora_A") for m in full_model.modules())  # the live model kept its adapters

    model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
    resumed = run(tmp_path / "b", model, resume=str(checkpoint), teacher=tiny_model("llama", gqa_ratio=3))
    assert len(resumed.reports) == 1
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert (
            model.get_base_model().config.pruned_layout[key] == full_model.get_base_model().config.pruned_layout[key]
        )
    torch.testing.assert_close(logits(model.eval()), logits(full_model.eval()), rtol=1e-4, atol=1e-5)


def test_a_pushed_lora_checkpoint_carries_the_pruned_base(fake_hub, tmp_path):
    """With hub_strategy="checkpoint" the Trainer uploads each checkpoint before `on_save` runs; the callback writes
    the pruned base into it when the push begins, so the pushed checkpoint resumes as the local one does."""
    from transformers import Trainer, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback
    from hf_adapt_pruner.checkpoints import PRUNED_BASE_DIR

    repo_id = "tester/lora-run"
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, report_to=[],
                             save_strategy="steps", save_steps=6, use_cpu=True, disable_tqdm=True, push_to_hub=True,
                             hub_model_id=repo_id, hub_strategy="checkpoint", hub_token="hf_test",
                             hub_always_push=True)  # fmt: skip
    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=24)]
    model = get_peft_model(tiny_model("llama", gqa_ratio=3), LoraConfig(r=4, target_modules="all-linear"))
    callback = AdaptPrunerCallback(CALLBACK_CONFIG, calibration_blocks(n=16, seed=3))
    Trainer(model=model.train(), args=args, train_dataset=data, callbacks=[callback]).train()

    local = tmp_path / "checkpoint-12" / PRUNED_BASE_DIR  # after both events (steps 0 and 11)
    written = sorted(local.iterdir())
    assert {"config.json", "model.safetensors"} <= {f.name for f in written}
    pushed = fake_hub.repos[repo_id].files
    assert "last-checkpoint/adapter_model.safetensors" in pushed
    for file in written:
        assert pushed[f"last-checkpoint/{PRUNED_BASE_DIR}/{file.name}"] == file.read_bytes(), file.name
    assert load_pruned(local).config.pruned_layout == model.get_base_model().config.pruned_layout


def test_the_pruned_base_writer_skips_only_the_checkpoint_its_push_wrote(tmp_path):
    """on_save skips the step whose push wrote pruned_base/; a later run that saves at the same step writes it."""
    from types import SimpleNamespace

    from hf_adapt_pruner.checkpoints import PRUNED_BASE_DIR, PrunedBaseWriter

    model = get_peft_model(tiny_model("llama", gqa_ratio=3), LoraConfig(r=4, target_modules="all-linear"))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_strategy="checkpoint")
    state = SimpleNamespace(global_step=6, is_world_process_zero=True)
    written = tmp_path / "checkpoint-6" / PRUNED_BASE_DIR
    written.parent.mkdir()
    writer = PrunedBaseWriter(CALLBACK_CONFIG)
    writer.on_push_begin(args, state, model)
    (written / "model.safetensors").unlink()
    writer.on_save(args, state, model)  # the same checkpoint: not written twice
    assert not (written / "model.safetensors").exists()
    writer.on_save(args, state, model)  # another run saving at step 6 (train() again): written
    assert (written / "model.safetensors").exists()


def test_a_search_trial_writes_its_pruned_base_into_its_own_run_folder(tmp_path, caplog):
    """A hyper-parameter search saves each trial into a run folder that only the Trainer names: the writer finds it by
    the trial's parameters in the saved state, and says where the pruned base went when it cannot."""
    import logging
    from types import SimpleNamespace

    from hf_adapt_pruner.checkpoints import PRUNED_BASE_DIR, PrunedBaseWriter

    model = get_peft_model(tiny_model("llama", gqa_ratio=3), LoraConfig(r=4, target_modules="all-linear"))
    args = SimpleNamespace(output_dir=str(tmp_path), hub_strategy="all_checkpoints")
    for run, learning_rate in (("run-0", 1e-4), ("run-1", 3e-4)):
        (tmp_path / run / "checkpoint-6").mkdir(parents=True)
        state = {"global_step": 6, "trial_params": {"learning_rate": learning_rate}}
        (tmp_path / run / "checkpoint-6" / "trainer_state.json").write_text(json.dumps(state))

    def trial(learning_rate):
        return SimpleNamespace(global_step=6, is_world_process_zero=True, is_hyper_param_search=True,
                               trial_params={"learning_rate": learning_rate})  # fmt: skip

    writer = PrunedBaseWriter(CALLBACK_CONFIG)
    writer.on_push_begin(args, trial(3e-4), model)
    writer.on_save(args, trial(3e-4), model)  # the checkpoint its push wrote
    assert [p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob(PRUNED_BASE_DIR)] == ["run-1"]
    writer.on_save(args, trial(1e-4), model)  # another trial, no push
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob(PRUNED_BASE_DIR)) == ["run-0", "run-1"]
    with caplog.at_level(logging.WARNING, logger="hf_adapt_pruner"):
        writer.on_push_begin(args, trial(5e-4), model)  # no run folder holds this trial: nothing to write into
        assert "its push lacks pruned_base/" in caplog.text
        writer.on_save(args, trial(5e-4), model)
    assert "move it beside the adapter's checkpoint" in caplog.text
    assert (tmp_path / "checkpoint-6" / PRUNED_BASE_DIR / "model.safetensors").exists()


@pytest.mark.slow  # two trials through optuna: about 7 s on idle cores, 17 s on busy ones
def test_each_hyperparameter_search_trial_checkpoint_carries_its_pruned_base(tmp_path):
    """`trainer.hyperparameter_search` saves each trial into its own run folder: the pruned base goes into it."""
    optuna = pytest.importorskip("optuna")
    from transformers import Trainer, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback

    def model_init(trial):
        return get_peft_model(tiny_model("llama", gqa_ratio=3), LoraConfig(r=4, target_modules="all-linear"))

    def space(trial):
        return {"learning_rate": trial.suggest_categorical("learning_rate", [1e-4, 1e-3])}

    data = [{"input_ids": b, "labels": b} for b in calibration_blocks(n=12)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, report_to=[],
                             save_strategy="steps", save_steps=6, use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    callback = AdaptPrunerCallback(CALLBACK_CONFIG, calibration_blocks(n=16, seed=3))
    trainer = Trainer(
        model_init=model_init, args=args, train_dataset=data, eval_dataset=data[:4], callbacks=[callback]
    )
    grid = optuna.samplers.GridSampler({"learning_rate": [1e-4, 1e-3]})  # two trials, two different folders
    trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=2, sampler=grid)
    checkpoints = sorted(tmp_path.glob("run-*/checkpoint-6"))
    assert len(checkpoints) == 2 and not (tmp_path / "checkpoint-6").exists()
    for checkpoint in checkpoints:
        model = PeftModel.from_pretrained(load_pruned(checkpoint / "pruned_base"), checkpoint)
        assert model.get_base_model().config.pruned_layout is not None
