"""save_pruned / load_pruned: checkpoints that load anywhere, every save path, safe writes and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GgufConfig, Trainer, TrainingArguments
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

from hf_adapt_pruner import PrunerConfig, load_pruned, prune_model, save_pruned
from hf_adapt_pruner.remote_code import CONFIG_FILE, MODELING_FILE

from tiny_models import MODEL_TYPES, VOCAB, calibration_blocks, pruned_tiny_model, tiny_model, tiny_tokenizer


INPUT = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
FRESH_LOAD = Path(__file__).parent / "fresh_load.py"


def logits(model, input_ids=INPUT):
    with torch.no_grad():
        return model(input_ids).logits


def load_in_fresh_process(*sources: str | Path, env: dict | None = None, plain: bool = False) -> dict | list[dict]:
    """Load each source in one new Python process where hf_adapt_pruner is not importable (a dict for one source, a
    list for several); with `plain`, with trust_remote_code=False."""
    result = subprocess.run(
        [sys.executable, str(FRESH_LOAD), *map(str, sources), json.dumps(INPUT.tolist()), *["plain"][: int(plain)]],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved_every_type(tmp_path_factory) -> dict:
    """Every supported type pruned and saved, then loaded in one fresh process (starting a process and importing
    torch and transformers cost more than the loads): model_type -> (model, its logits, folder, what the process saw).
    Each folder has its own name, so each gets its own module of remote code."""
    root = tmp_path_factory.mktemp("anywhere")
    saved = {}
    for model_type in MODEL_TYPES:
        model = pruned_tiny_model(model_type)
        folder = save_pruned(model, root / f"pruned_{model_type}", tiny_tokenizer(),
                             pruner_config=PrunerConfig(target_ratio=0.6))  # fmt: skip
        saved[model_type] = (model, logits(model), folder)
    fresh = load_in_fresh_process(*(folder for _, _, folder in saved.values()))
    return {model_type: (*saved[model_type], seen) for model_type, seen in zip(saved, fresh)}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_model_loads_anywhere(model_type, saved_every_type):
    model, expected, folder, fresh = saved_every_type[model_type]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", CONFIG_FILE, MODELING_FILE, "generation_config.json",
            "tokenizer.json", "pruner_config.json", "README.md"} <= names  # fmt: skip
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    for code_file in (CONFIG_FILE, MODELING_FILE):  # self-contained: only torch, transformers and the sibling
        imports = [
            line for line in (folder / code_file).read_text().splitlines() if line.startswith(("import", "from"))
        ]
        assert all(line.split()[1].split(".")[0] in ("torch", "transformers", "") for line in imports), imports
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"adapt_pruned_{model_type}"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_adapt_pruner.AdaptPrunedForCausalLM"
    assert config["pruned_layout"]["num_attention_heads"] == model.config.pruned_layout["num_attention_heads"]

    assert fresh["class"].startswith("transformers_modules.")
    assert (torch.tensor(fresh["logits"]) - expected).abs().max() <= 1e-6
    assert fresh["generated_shape"] == [2, 13]
    assert fresh["tokenized"] == [5, 6]
    assert fresh["pipeline_text"].startswith("w5 w6 w7")


def test_load_pruned_runs_no_remote_code(tmp_path):
    model = pruned_tiny_model("qwen3")
    folder = save_pruned(model, tmp_path / "m")
    (folder / MODELING_FILE).write_text("raise RuntimeError('remote code ran')\n")  # must never be executed
    loaded = load_pruned(folder, attn_implementation="eager")
    assert type(loaded).__module__.startswith("hf_adapt_pruner_generated.")
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="never runs remote code"):
        load_pruned(folder, trust_remote_code=True)


def test_save_pretrained_after_prune_writes_a_pruned_checkpoint(tmp_path):
    model = pruned_tiny_model("mistral")
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / MODELING_FILE).exists() and (tmp_path / "plain" / CONFIG_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", trust_remote_code=True,
                                                    attn_implementation="eager")  # fmt: skip
    assert torch.equal(logits(reloaded), logits(model))


def test_trainer_save_model_and_checkpoints_are_loadable(tmp_path):
    model = pruned_tiny_model("llama").train()
    data = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=8, seq_len=16)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, save_only_model=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"):
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
        assert loaded.config.pruned_layout["intermediate_size"] == model.config.pruned_layout["intermediate_size"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final", trust_remote_code=True,
                                                 attn_implementation="eager")  # fmt: skip
    torch.testing.assert_close(logits(final), logits(model.eval()), atol=1e-6, rtol=0)


def test_existing_folder_needs_overwrite_and_failures_leave_it_intact(tmp_path):
    model = pruned_tiny_model("llama")
    target = tmp_path / "out"
    save_pruned(model, target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, target)

    class Broken:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, target, Broken(), overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before  # the old save is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    save_pruned(model, target, tiny_tokenizer(), overwrite=True)
    assert (target / "tokenizer.json").exists()


def test_layout_that_disagrees_with_weights_names_layer_and_tensor(tmp_path):
    folder = save_pruned(pruned_tiny_model("llama"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["pruned_layout"]["intermediate_size"][1] += 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer 1: tensor 'model\.layers\.1\.mlp\.gate_proj\.weight'"):
        load_pruned(folder)
    with pytest.raises(Exception, match="mismatched"):  # the remote-code path: transformers' load report names them
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("corruption", ["missing", "not_a_dict", "short_list"])
def test_missing_or_corrupted_layout_gives_a_clear_error(tmp_path, corruption):
    folder = save_pruned(pruned_tiny_model("llama"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    if corruption == "missing":
        del config["pruned_layout"]
    elif corruption == "not_a_dict":
        config["pruned_layout"] = "oops"
    else:
        config["pruned_layout"]["num_attention_heads"] = [6]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pruned_layout"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    if corruption != "missing":
        with pytest.raises(ValueError, match="pruned_layout"):
            load_pruned(folder)


def test_unpruned_model_gets_a_plain_save(tmp_path):
    model = tiny_model("qwen2")
    folder = save_pruned(model, tmp_path / "plain", tiny_tokenizer())
    assert not (folder / MODELING_FILE).exists() and not (folder / "README.md").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(logits(reloaded), logits(model))
    assert torch.equal(logits(load_pruned(folder, attn_implementation="eager")), logits(model))


def test_model_card(tmp_path):
    model = pruned_tiny_model("llama")
    folder = save_pruned(model, tmp_path / "m", pruner_config=PrunerConfig(target_ratio=0.6, amplitude=0.1),
                         eval_results={"perplexity (held-out)": 12.5}, base_model="org/base", license="apache-2.0",
                         repo_id="me/tiny-pruned")  # fmt: skip
    card = (folder / "README.md").read_text()
    header = card.split("---")[1]
    for expected in ("base_model: org/base", "library_name: transformers", "- pruned", "- adapt-pruner",
                     "license: apache-2.0"):  # fmt: skip
        assert expected in header
    assert "me/tiny-pruned" in card and "| perplexity (held-out) | 12.5 |" in card
    assert '"amplitude": 0.1' in card
    first_layer = model.config.pruned_layout
    assert f"| 0 | {first_layer['num_attention_heads'][0]} | {first_layer['num_key_value_heads'][0]} |" in card


def test_gguf_loaded_models_save(tmp_path):
    """A GGUF-loaded model is dense but keeps a quantizer marker that makes save_pretrained refuse."""
    model = tiny_model("llama")
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="model.gguf", dequantize=True))
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    prune_model(model, PrunerConfig(target_ratio=0.7, inner_steps=1, calibration_samples=4), calibration_blocks(),
                progress=False)  # fmt: skip
    folder = save_pruned(model, tmp_path / "m")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert torch.equal(logits(load_pruned(folder, attn_implementation="eager")), logits(model))
