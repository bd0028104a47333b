"""AdaptPrunerCallback under DDP: 2 CPU processes (gloo) launched with torchrun, running tests/distributed_job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_serialization import load_in_fresh_process


JOB = Path(__file__).parent / "distributed_job.py"


def launch(output: Path, mode: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
               str(output), mode]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def run_job(tmp_path_factory, mode: str) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp(mode)
    job = launch(output, mode)
    assert job.returncode == 0, job.stderr[-4000:]
    return output, json.loads((output / "result.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return run_job(tmp_path_factory, "resume")  # physical pruning, then a resumed run from the mid checkpoint


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    return run_job(tmp_path_factory, "mask")


@pytest.mark.parametrize("run", ["ddp_run", "mask_run"])
def test_ranks_stay_bit_identical_through_prune_events(run, request):
    _, result = request.getfixturevalue(run)
    assert [c["step"] for c in result["checks"]] == [2, 9]
    assert {c["mode"] for c in result["checks"]} == {"physical" if run == "ddp_run" else "mask"}
    assert all(c["identical"] for c in result["checks"]) and result["final_identical"]
    for check, target in zip(result["checks"], result["targets"]):
        assert abs(check["params"] - target) <= 0.01 * target
    assert result["checks"][0]["params"] > result["checks"][1]["params"] == result["params"]
    assert all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.mark.parametrize("run", ["ddp_run", "mask_run"])
def test_saved_model_loads_in_a_fresh_process_with_equal_logits(run, request):
    output, _ = request.getfixturevalue(run)
    expected = torch.load(output / "logits.pt")  # the trained (masked) model's, on test_serialization.INPUT
    loaded = load_in_fresh_process(output / "final")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=0)
    checkpoint = json.loads((output / "run" / "checkpoint-12" / "config.json").read_text())
    if run == "ddp_run":
        assert checkpoint["model_type"] == "adapt_pruned_llama"  # Trainer checkpoints are pruned models too
    else:  # full-size stock checkpoints that carry their masks; save_pruned slices them
        assert checkpoint["model_type"] == "llama" and "pruned_mask" in checkpoint


def test_mask_mode_keeps_masked_weights_at_zero(mask_run):
    _, result = mask_run
    assert result["masked_zero_every_step"]


def test_resume_under_ddp_ends_with_the_same_layout(ddp_run):
    _, result = ddp_run
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert result["resumed_layout"][key] == result["layout"][key]
    assert result["resumed_params"] == result["params"]


@pytest.mark.parametrize(
    ("mode", "message"),
    [("disagree", "chose other heads or channels than rank 0"), ("unattached", "call callback.attach(trainer)")],
)
def test_clear_errors_stop_every_rank(mode, message, tmp_path):
    job = launch(tmp_path, mode)  # disagree: rank 1 keeps the lowest-scored channels
    assert job.returncode != 0
    assert message in job.stderr
    assert not (tmp_path / "result.json").exists()
