"""AdaptPrunerCallback in 2 CPU processes (gloo) launched with torchrun: under the Trainer's DDP
(tests/distributed_job.py) and on an FSDP2-sharded model (tests/fsdp_job.py: the Trainer will not shard on CPU)."""

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
DDP_RUNS = ["ddp_run", "accelerate_run", "unattached_run", "accelerate_unattached_run"]  # physical pruning
# The quick run keeps ddp_run (torchrun: physical pruning, checkpoints, resume), distill_run (a teacher per rank) and
# mask mode across ranks by fsdp_run; finding the Trainer without attach() is tested in one process
# (test_unattached.py). CI runs all (each 2-process job takes 15-40 s)
SLOW_RUNS = {"accelerate_run", "unattached_run", "accelerate_unattached_run", "mask_run"}


def runs(*names: str) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_RUNS else name for name in names]


FSDP_JOB = Path(__file__).parent / "fsdp_job.py"


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# accelerate's own launcher; --multi_gpu is its torchrun-based launcher (--cpu would ask for MPI); the job runs on CPU
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def launch(output: Path, mode: str, job: Path = JOB, launcher: list = TORCHRUN) -> subprocess.CompletedProcess:
    command = [*launcher, str(job), str(output), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def run_job(tmp_path_factory, mode: str, job: Path = JOB, launcher: list = TORCHRUN) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp(mode)
    job = launch(output, mode, job, launcher)
    assert job.returncode == 0, job.stderr[-4000:]
    return output, json.loads((output / "result.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return run_job(tmp_path_factory, "resume")  # physical pruning, then a resumed run from the mid checkpoint


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    return run_job(tmp_path_factory, "resume", launcher=ACCELERATE)  # the same job under `accelerate launch`


@pytest.fixture(scope="module")
def unattached_run(tmp_path_factory):  # the user's script unchanged: callbacks=[...], no callback.attach(trainer)
    return run_job(tmp_path_factory, "unattached")


@pytest.fixture(scope="module")
def accelerate_unattached_run(tmp_path_factory):
    return run_job(tmp_path_factory, "unattached", launcher=ACCELERATE)


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    return run_job(tmp_path_factory, "distill")  # a teacher per rank, then a resume with the original as teacher


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    return run_job(tmp_path_factory, "uniform")  # layout="uniform", distilling from a teacher per rank


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    return run_job(tmp_path_factory, "mask")


@pytest.fixture(scope="module", params=["training", pytest.param("calibration", marks=pytest.mark.slow)])
def fsdp_run(request, tmp_path_factory):
    return run_job(tmp_path_factory, request.param, FSDP_JOB)  # importance from training or calibration batches


@pytest.mark.parametrize("run", runs(*DDP_RUNS, "mask_run", "distill_run"))
def test_ranks_stay_bit_identical_through_prune_events(run, request):
    _, result = request.getfixturevalue(run)
    assert [c["step"] for c in result["checks"]] == [2, 9]
    assert {c["mode"] for c in result["checks"]} == {"mask" if run == "mask_run" else "physical"}
    assert all(c["identical"] for c in result["checks"]) and result["final_identical"]
    # each event refit the kept weights from both ranks' window tokens (2 steps x 2 ranks x 2 x 16 tokens, at least)
    assert all(c["refit_tokens"] >= 2 * 2 * 2 * 16 for c in result["checks"])
    for check, target in zip(result["checks"], result["targets"]):
        assert abs(check["params"] - target) <= 0.01 * target
    assert result["checks"][0]["params"] > result["checks"][1]["params"] == result["params"]
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["events_file"] == [[1, result["checks"][0]["params"]], [2, result["params"]]]


@pytest.mark.parametrize("run", runs(*DDP_RUNS, "mask_run"))
def test_saved_model_loads_in_a_fresh_process_with_equal_logits(run, request):
    output, result = request.getfixturevalue(run)
    expected = torch.load(output / "logits.pt")  # the trained (masked) model's, on test_serialization.INPUT
    loaded = load_in_fresh_process(output / "final")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=0)
    checkpoint = json.loads((output / "run" / "checkpoint-12" / "config.json").read_text())
    assert result["saved_params"] == result["params"]  # the saved model is at the last stage's target
    if run != "mask_run":
        assert checkpoint["model_type"] == "adapt_pruned_llama"  # Trainer checkpoints are pruned models too
    else:  # full-size stock checkpoints that carry their masks; save_pruned slices them
        assert checkpoint["model_type"] == "llama" and "pruned_mask" in checkpoint


@pytest.mark.parametrize("run", runs("unattached_run", "accelerate_unattached_run"))
def test_unattached_callback_finds_the_trainer_and_goes_first(run, request):
    _, result = request.getfixturevalue(run)  # physical pruning (checked above) needs the DDP wrapper
    assert result["found_trainer"] and result["first_callback"]


@pytest.mark.slow
def test_mask_mode_keeps_masked_weights_at_zero(mask_run):
    _, result = mask_run
    assert result["masked_zero_every_step"]


@pytest.mark.parametrize("run", runs("ddp_run", "accelerate_run", "distill_run"))
def test_resume_under_ddp_ends_with_the_same_layout(run, request):
    _, result = request.getfixturevalue(run)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert result["resumed_layout"][key] == result["layout"][key]
    assert result["resumed_params"] == result["params"]


def test_distillation_under_ddp_keeps_one_frozen_unpruned_teacher_per_rank(distill_run):
    _, result = distill_run
    for check in result["checks"]:  # after each prune event
        teacher = check["teacher"]
        assert teacher["identical"] and teacher["frozen"] and teacher["outside_ddp"]
        assert teacher["params"] > check["params"]  # the student is pruned, the teacher is not
    assert len(result["distill_logs"]) >= 4 and result["distill_logs_identical"]  # reduced over the ranks


def test_fsdp2_prunes_with_masks_that_stay_zero(fsdp_run):
    _, result = fsdp_run
    assert [e["mode"] for e in result["events"]] == ["mask", "mask"]
    assert all(e["same_on_every_rank"] for e in result["events"])
    assert result["zero_after_every_step"]  # weights and Adam moments of masked units, gathered from the shards
    assert all(e["refit_tokens"] > 0 for e in result["events"])  # the sharded weights were refit, row by row
    for event, target in zip(result["events"], result["targets"]):  # at most one head group below the target
        assert target * 0.95 <= event["params"] <= target * 1.005
    assert result["events"][0]["params"] > result["events"][1]["params"] == result["params"]
    assert all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.fixture(scope="module")
def fsdp_distill_run(tmp_path_factory):
    return run_job(tmp_path_factory, "distill", FSDP_JOB)  # a full teacher on every rank beside the sharded student


@pytest.mark.slow
def test_fsdp2_distillation_with_a_full_teacher_and_pure_kl_refused(fsdp_distill_run):
    _, result = fsdp_distill_run
    assert "alpha=1.0" in result["refusal"]  # the given teacher has the sharded model's weights
    assert result["zero_after_every_step"] and all(e["same_on_every_rank"] for e in result["events"])
    assert result["teacher_frozen"] and result["teacher_params"] > result["params"]
    logs = result["distill_logs"]
    assert all(set(log) == {"distill/ce", "distill/kl"} for log in logs)  # every step logged (reduced over ranks)
    assert logs[0]["distill/kl"] < 1e-6  # before the first optimizer step the student is the teacher, gathered
    assert all(log["distill/kl"] > 0 for log in logs[1:])
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_fsdp2_save_gathers_and_slices_with_equal_logits(fsdp_run):
    output, _ = fsdp_run
    expected = torch.load(output / "logits.pt")  # the sharded, masked model's
    loaded = load_in_fresh_process(output / "final")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=0)
    config = json.loads((output / "final" / "config.json").read_text())
    assert config["model_type"] == "adapt_pruned_llama" and "pruned_mask" not in config


@pytest.mark.parametrize(
    ("mode", "message", "job"),
    [
        ("disagree", "chose other heads or channels than rank 0", JOB),
        pytest.param(
            "physical", "mode='physical' cannot resize sharded parameters (FSDP2)", FSDP_JOB, marks=pytest.mark.slow
        ),
    ],
)
def test_clear_errors_stop_every_rank(mode, message, job, tmp_path):
    job = launch(tmp_path, mode, job)  # disagree: rank 1 keeps the lowest-scored channels
    assert job.returncode != 0
    assert message in job.stderr
    assert not (tmp_path / "result.json").exists()


def test_uniform_layout_under_ddp_with_distillation_saves_the_stock_architecture(uniform_run):
    output, result = uniform_run
    assert all(c["identical"] and c["teacher"]["identical"] for c in result["checks"]) and result["final_identical"]
    for check, target in zip(result["checks"], result["targets"]):
        assert abs(check["params"] - target) <= 0.01 * target
    layout = result["layout"]
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    assert len(set(zip(*(layout[key] for key in keys)))) == 1  # every layer the same widths
    for folder in (output / "run" / "checkpoint-12", output / "final"):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "llama" and "auto_map" not in config
    loaded = load_in_fresh_process(output / "final", plain=True)  # no remote code
    torch.testing.assert_close(torch.tensor(loaded["logits"]), torch.load(output / "logits.pt"), atol=1e-5, rtol=0)
