"""`hf-adapt-pruner prune` end to end on a tiny model folder and a folder of text files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_adapt_pruner.cli import main

from tiny_models import VOCAB, tiny_model, tiny_tokenizer


@pytest.fixture
def model_and_text(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("qwen3", gqa_ratio=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i in range(10):  # whole files go to calibration or evaluation
        words = " ".join(f"w{3 + (i * 7 + j * 13) % (VOCAB - 3)}" for j in range(400))
        (text_dir / f"doc{i}.txt").write_text(words)
    return model_dir, text_dir


def test_cli_prunes_reports_and_saves(model_and_text, tmp_path, capsys):
    model_dir, text_dir = model_and_text
    output = tmp_path / "out"
    code = main(["prune", str(model_dir), "--target-ratio", "0.7", "--calibration", str(text_dir), "--output",
                 str(output), "--inner-steps", "3", "--calibration-samples", "8", "--calibration-seq-len", "32",
                 "--round-to", "1", "--eval-blocks", "4", "--prompt", "w5 w6",
                 "--calibration-checkpointing", "on"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{\n") :])
    assert abs(result["params_after"] / result["params_before"] - 0.7) < 0.01
    assert result["perplexity_after"] > 0 and result["perplexity_before"] > 0
    assert "| layer | importance |" in printed
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == result["params_after"]
    saved = json.loads((output / "pruner_config.json").read_text())
    assert saved["inner_steps"] == 3 and saved["calibration_checkpointing"] == "on"


def test_cli_eval_reports_perplexity_and_speed(model_and_text, capsys):
    model_dir, text_dir = model_and_text
    assert main(["eval", str(model_dir), "--text", str(text_dir), "--blocks", "4", "--seq-len", "32",
                 "--new-tokens", "8"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{\n") :])
    assert result["blocks"] == 4 and result["perplexity"] > 1
    assert result["generate_tokens_per_s"] > 0 and result["forward_ms"] > 0


def test_readme_architecture_table_is_the_registry():
    """The README's table is `hf-adapt-pruner architectures` (a fresh process: tests may register more types)."""
    printed = subprocess.run([sys.executable, "-m", "hf_adapt_pruner.cli", "architectures"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- architectures:start -->\n")[1].split("<!-- architectures:end -->")[0]
    assert block == printed, (
        "README.md is stale: paste the output of `hf-adapt-pruner architectures` between the markers"
    )
