"""config.json keeps only the widths; the kept indices of every prune event go to pruning_history.json beside it."""

from __future__ import annotations

import json
import logging

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_adapt_pruner import (
    AdaptPrunerCallback,
    PrunerConfig,
    load_pruned,
    prune_model,
    pruning_history,
    push_pruned_to_hub,
    save_pruned,
)
from hf_adapt_pruner.history import HISTORY_FILE

from test_serialization import load_in_fresh_process, logits
from tiny_models import calibration_blocks, pruned_tiny_model, tiny_model, tiny_tokenizer


CONFIG = dict(inner_steps=2, calibration_samples=4, round_to=1, amplitude=0.1)


def _saved(tmp_path, model_type="llama"):
    model = pruned_tiny_model(model_type)
    return model, save_pruned(model, tmp_path / "m", tiny_tokenizer())


def _to_old_form(folder) -> None:
    """What earlier versions wrote: the history inside config.json, no history file."""
    config = json.loads((folder / "config.json").read_text())
    config["pruned_layout"]["history"] = json.loads((folder / HISTORY_FILE).read_text())["history"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / HISTORY_FILE).unlink()


def test_config_holds_widths_and_the_history_has_its_own_file(tmp_path):
    model, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "history" not in config["pruned_layout"] and "history" not in model.config.pruned_layout
    widths = {"num_attention_heads", "num_key_value_heads", "intermediate_size"}
    assert set(config["pruned_layout"]) == {"format_version", "head_dim", "base", "sparsity", *widths}
    document = json.loads((folder / HISTORY_FILE).read_text())
    assert document["history"] == pruning_history(model) and len(document["history"]) == 1
    assert document["intermediate_size"] == config["pruned_layout"]["intermediate_size"]
    event = document["history"][0]
    assert set(event) == {"num_parameters", "layer_importance", "layers"}
    assert all(set(kept) == {"q_heads", "kv_heads", "channels"} for kept in event["layers"].values())

    loaded = load_pruned(folder, attn_implementation="eager")
    assert pruning_history(loaded) == pruning_history(model)
    assert torch.equal(logits(loaded), logits(model))


def test_history_continues_across_loads_and_events(tmp_path):
    _, folder = _saved(tmp_path)
    # remote-code loading (as on a machine without the package) then pruning further with the package
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert len(pruning_history(model)) == 1  # read from the file beside the config it was loaded from
    prune_model(model, PrunerConfig(target_ratio=0.45, **CONFIG), calibration_blocks(), progress=False)
    assert len(pruning_history(model)) == 2
    again = save_pruned(model, tmp_path / "again")
    assert len(json.loads((again / HISTORY_FILE).read_text())["history"]) == 2
    assert "history" not in json.loads((again / "config.json").read_text())["pruned_layout"]


def test_models_saved_in_the_old_form_still_load_and_move_the_history_out(tmp_path):
    model, folder = _saved(tmp_path, "qwen2")
    expected_history = pruning_history(model)
    _to_old_form(folder)
    loaded = load_pruned(folder, attn_implementation="eager")
    assert pruning_history(loaded) == expected_history
    assert "history" not in loaded.config.pruned_layout  # later saves (Trainer checkpoints too) write it apart
    assert torch.equal(logits(loaded), logits(model))
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert torch.equal(logits(remote), logits(model))
    assert pruning_history(remote) == expected_history  # read from the old config
    resaved = save_pruned(remote, tmp_path / "resaved")
    assert "history" not in json.loads((resaved / "config.json").read_text())["pruned_layout"]
    assert json.loads((resaved / HISTORY_FILE).read_text())["history"] == expected_history
    fresh = load_in_fresh_process(folder)  # without the package, the old form loads as before
    assert (torch.tensor(fresh["logits"]) - logits(model)).abs().max() <= 1e-6


def test_a_history_file_of_another_save_is_ignored_with_a_warning(tmp_path, caplog):
    _, folder = _saved(tmp_path)
    document = json.loads((folder / HISTORY_FILE).read_text())
    document["intermediate_size"][0] += 1
    (folder / HISTORY_FILE).write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING):
        loaded = load_pruned(folder)
    assert pruning_history(loaded) == []
    assert "belongs to another save" in caplog.text
    (folder / HISTORY_FILE).write_text("{not json")
    assert pruning_history(load_pruned(folder)) == []
    assert (folder / HISTORY_FILE).read_text() == "{not json"  # reported and ignored, never deleted


def test_mask_mode_keeps_the_history_out_of_the_config(tmp_path):
    model = tiny_model("llama")
    prune_model(model, PrunerConfig(target_ratio=0.6, mode="mask", **CONFIG), calibration_blocks(), progress=False)
    assert "history" not in model.config.pruned_mask and len(pruning_history(model)) == 1
    folder = save_pruned(model, tmp_path / "m")
    assert len(json.loads((folder / HISTORY_FILE).read_text())["history"]) == 1


def test_trainer_checkpoints_get_the_history_file(tmp_path):
    model = tiny_model("llama").train()
    data = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=32, seq_len=16, seed=5)]
    config = PrunerConfig(target_ratio=0.6, num_stages=2, importance_window=2, inner_steps=2, round_to=1,
                          min_intermediate_size=1)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, save_steps=6, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, save_only_model=True,
                             disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaptPrunerCallback(config)]).train()
    for step in (6, 12):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        config_json = json.loads((checkpoint / "config.json").read_text())
        assert "history" not in config_json["pruned_layout"]
        history = json.loads((checkpoint / HISTORY_FILE).read_text())
        assert history["intermediate_size"] == config_json["pruned_layout"]["intermediate_size"]
        loaded = load_pruned(checkpoint)
        assert len(pruning_history(loaded)) == len(history["history"]) >= 1
    assert len(pruning_history(model)) == 2


def test_push_uploads_the_history_and_load_reads_it_back(fake_hub):
    model = pruned_tiny_model("llama")
    push_pruned_to_hub(model, "tester/with-history", tiny_tokenizer(), token="hf_test")
    files = fake_hub.repos["tester/with-history"].files
    assert json.loads(files[HISTORY_FILE])["history"] == pruning_history(model)
    assert b'"history"' not in files["config.json"]
    assert pruning_history(load_pruned("tester/with-history", token="hf_test")) == pruning_history(model)
