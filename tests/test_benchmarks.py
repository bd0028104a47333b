"""Every benchmark script runs end to end in its --smoke variant (tiny model) and writes JSON; make_docs renders."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # subprocess runs of whole scripts, 13-70 s each: CI runs them (CI=true), the quick command not
@pytest.mark.parametrize(
    ("script", "key"),
    [("one_shot_quality", "mean_perplexity"), ("one_shot_cost", "rows"), ("one_shot_time", "mean_seconds"),
     ("taylor_scale", "runs"),
     ("main_job_allocation", "rows"), ("inference_speed", "rows"), ("callback_overhead", "runs"),
     ("memory", "rss_peak_bytes"), ("incremental_vs_one_shot", "rows"), ("distributed", "runs"),
     ("gguf_serving", "rows"), ("distillation", "summary"), ("stages_budget", "summary"), ("layout_files", "rows"),
     ("prune_memory", "rows"), ("reconstruction", "mean"), ("reconstruction_time", "mean_seconds"),
     ("reconstruction_main_job", "summary"), ("uniform_main_job", "summary")],
)  # fmt: skip
def test_benchmark_smoke(script, key, tmp_path):
    if script == "gguf_serving" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("pip install '.[serve]' (llama-cpp-python)")
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["smoke"] and key in payload


def test_make_docs_renders_the_committed_results(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "make_docs.py"), "--docs", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks")
    pairs = text.split("## One-shot: adaptive against attention not pruned, paired by seed")[1]
    assert "| 0.8 | 0, 1, 2, 3 | " in pairs  # one_shot_pairs.json beside the sweep
    assert text.count("| section | date | CPU | threads | torch | transformers |") == 1  # the setting, stated once
    for word in ("issue", "previous", "session", "alpha 1.0"):  # the page speaks of the product, not its history
        assert word not in text.lower(), word
    committed = BENCHMARKS.parent / "docs" / "benchmarks.md"
    assert committed.read_text() == text, "docs/benchmarks.md is stale: run python benchmarks/make_docs.py"
