"""bfloat16 models end to end (API and CLI), scores summed in float32 or wider, and device handling without a GPU.

The machine running the suite has no GPU: CUDA-only paths are checked by reading (see the issue-15 notes), and the
meta device stands in for "a device other than the CPU" where mixing devices would fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_adapt_pruner import PrunerConfig, load_pruned, prune_model, save_pruned
from hf_adapt_pruner import distributed as distributed_module
from hf_adapt_pruner.allocation import select_heads
from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.checks import resolve_device
from hf_adapt_pruner.cli import main
from hf_adapt_pruner.data import CalibrationPool
from hf_adapt_pruner.importance import GroupScores, group_scores
from hf_adapt_pruner.layout import LayerWidths
from hf_adapt_pruner.scorers import CalibrationScorer, autocast_dtype
from hf_adapt_pruner.serialization import load_for_pruning
from hf_adapt_pruner.surgery import head_rows

from tiny_models import VOCAB, calibration_blocks, tiny_model, tiny_tokenizer


def saved_dtypes(folder) -> set[torch.dtype]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_taylor_scores_of_bfloat16_weights_are_summed_in_float32():
    """|w * grad| is formed and summed in float32: bfloat16 sums over a row would be off by ~1e-3 relative."""
    model = tiny_model("llama", gqa_ratio=2).to(torch.bfloat16)
    ids = calibration_blocks(4, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    lm = layer_modules(model, get_architecture("llama"))[0]
    scores = group_scores(lm, 8, "taylor")
    assert {t.dtype for t in (scores.q_heads, scores.kv_heads, scores.channels)} == {torch.float64}
    mlp = lm.layer.mlp
    parts = ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))  # (module, dimension summed over)
    reference = sum((m.weight.double() * m.weight.grad.double()).abs().sum(dim=d) for m, d in parts)  # same values
    assert torch.allclose(scores.channels, reference, rtol=1e-5, atol=0)
    in_bfloat16 = sum((m.weight * m.weight.grad).abs().sum(dim=d) for m, d in parts)
    assert not torch.allclose(in_bfloat16.double(), reference, rtol=1e-5, atol=0)  # the test would see the difference


def test_prune_model_in_bfloat16_lands_on_target_and_saves_bfloat16(tmp_path, monkeypatch):
    measured = []
    measure = CalibrationScorer._measure

    def spy(self, layers, head_dim):
        raw, scores = measure(self, layers, head_dim)
        measured.append((raw, scores))
        return raw, scores

    monkeypatch.setattr(CalibrationScorer, "_measure", spy)
    tiny_model("qwen2", gqa_ratio=3).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    # Loaded in bfloat16 (not `.to(bfloat16)`, which would also round the float32 rotary buffers)
    model, tokenizer = load_for_pruning(tmp_path / "base", dtype=torch.bfloat16, device="auto")
    config = PrunerConfig(target_ratio=0.7, inner_steps=3, calibration_samples=8, round_to=1)
    report = prune_model(model, config, calibration_blocks(), progress=False)
    assert measured
    for raw, scores in measured:
        tensors = [raw, *(t for s in scores for t in (s.q_heads, s.kv_heads, s.channels))]
        assert all(t.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(t).all()) for t in tensors)
    assert abs(report.params_after - report.target_params) <= config.target_tolerance * report.target_params
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    folder = save_pruned(model, tmp_path / "m", tokenizer, pruner_config=config)
    assert saved_dtypes(folder) == {torch.bfloat16}
    loaded = load_pruned(folder, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = calibration_blocks(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_float16_taylor_scoring_warns_and_names_bfloat16(caplog):
    model = tiny_model("llama").to(torch.float16)
    pool = CalibrationPool(calibration_blocks(), 4, 4, seed=0)
    with caplog.at_level("WARNING", logger="hf_adapt_pruner.scorers"):
        CalibrationScorer(model, pool, "cosine", "taylor", seed=0)
    assert "bfloat16" in caplog.text and "float16" in caplog.text


def test_calibration_autocast_auto_takes_bfloat16_only_for_float32_models_on_bfloat16_hardware(monkeypatch):
    model = tiny_model("llama")
    assert autocast_dtype("off", model) is None
    assert autocast_dtype("bfloat16", model) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert autocast_dtype("auto", model) is torch.bfloat16
    assert autocast_dtype("auto", tiny_model("llama").to(torch.bfloat16)) is None  # runs in 16 bits already
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast_dtype("auto", model) is None
    with pytest.raises(ValueError, match=r"calibration_autocast=.fp8.*auto, bfloat16, off"):
        PrunerConfig(target_ratio=0.7, calibration_autocast="fp8")


def test_bfloat16_autocast_scoring_runs_in_bfloat16_and_ranks_like_float32():
    """The forward runs in bfloat16, the weights and their gradients stay float32, and the scores differ from float32
    scoring by bfloat16 rounding only: the channels rank alike and every layer's weakest kv group is the same."""
    model = tiny_model("llama", gqa_ratio=2)
    layers = layer_modules(model, get_architecture("llama"))
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    measured = {}
    for setting in ("off", "bfloat16"):
        seen.clear()
        pool = CalibrationPool(calibration_blocks(16, 32), 16, 8, seed=0)
        scorer = CalibrationScorer(model, pool, "cosine", "taylor", seed=0, progress=False, autocast=setting)
        measured[setting] = scorer(layers, model.config.head_dim)
        assert set(seen) == {torch.bfloat16 if setting == "bfloat16" else torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32} and all(p.grad is None for p in model.parameters())
    (raw32, scores32), (raw16, scores16) = measured["off"], measured["bfloat16"]
    assert torch.allclose(raw16, raw32, rtol=0.01)
    for a, b in zip(scores32, scores16):
        assert b.channels.dtype == torch.float64 and not torch.equal(a.channels, b.channels)  # bfloat16 did run
        assert float(((a.channels - b.channels).abs() / a.channels).median()) < 0.01
        ranks = torch.stack([a.channels.argsort().argsort(), b.channels.argsort().argsort()]).double()
        assert torch.corrcoef(ranks)[0, 1] > 0.98
        assert a.kv_heads.argmin() == b.kv_heads.argmin()


# --- command line ------------------------------------------------------------------------------------------------
@pytest.fixture
def model_and_text(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", gqa_ratio=2).save_pretrained(model_dir)  # float32 on disk: --dtype converts on load
    tiny_tokenizer().save_pretrained(model_dir)
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i in range(10):
        (text_dir / f"doc{i}.txt").write_text(" ".join(f"w{3 + (i * 7 + j * 13) % (VOCAB - 3)}" for j in range(300)))
    return model_dir, text_dir


def printed_result(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{\n") :])


def test_cli_prunes_and_evaluates_in_bfloat16(model_and_text, tmp_path, capsys):
    model_dir, text_dir = model_and_text
    output = tmp_path / "out"
    assert main(["prune", str(model_dir), "--dtype", "bfloat16", "--device", "cpu", "--target-ratio", "0.7",
                 "--calibration", str(text_dir), "--output", str(output), "--inner-steps", "2",
                 "--calibration-samples", "8", "--calibration-seq-len", "32", "--round-to", "1", "--eval-blocks", "2",
                 "--prompt", "w5 w6"]) == 0  # fmt: skip
    result = printed_result(capsys)
    assert abs(result["params_after"] / result["params_before"] - 0.7) < 0.01
    assert saved_dtypes(output) == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == result["params_after"]

    assert main(["eval", str(output), "--dtype", "bfloat16", "--device", "auto", "--text", str(text_dir),
                 "--blocks", "2", "--seq-len", "32", "--new-tokens", "0"]) == 0  # fmt: skip
    evaluated = printed_result(capsys)
    assert evaluated["parameters"] == result["params_after"]
    assert 1 < evaluated["perplexity"] < float("inf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_cli_device_cuda_without_cuda_names_the_fix(command, model_and_text, tmp_path, capsys):
    model_dir, text_dir = model_and_text
    args = {"prune": ["--target-ratio", "0.7", "--calibration", str(text_dir), "--output", str(tmp_path / "o")],
            "eval": ["--text", str(text_dir)]}[command]  # fmt: skip
    assert main([command, str(model_dir), "--device", "cuda", *args]) == 2
    error = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in error
    assert "--device cpu" in error and "--device auto" in error
    assert not (tmp_path / "o").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cpu'.*device='auto'"):
            resolve_device("cuda:1")


# --- device consistency (the meta device stands in for a GPU) -------------------------------------------------
def test_index_helpers_build_on_the_device_of_their_inputs():
    meta = torch.device("meta")
    assert head_rows(torch.tensor([0, 2], device=meta), 4).device == meta
    scores = GroupScores(torch.rand(6).to(meta), torch.rand(2).to(meta), torch.rand(8).to(meta))
    for target in (LayerWidths(3, 1, 8), LayerWidths(4, 2, 8), LayerWidths(6, 2, 8)):  # kv group, per group, all
        assert {t.device for t in select_heads(scores, target)} == {meta}


def test_collectives_use_the_device_their_backend_needs(monkeypatch):
    """NCCL takes only CUDA tensors (the importances and plans are averaged/compared there); gloo takes CPU ones."""
    monkeypatch.setattr(distributed_module.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed_module.communication_device() == torch.device("cuda", 1)
    monkeypatch.setattr(distributed_module.dist, "get_backend", lambda group=None: "gloo")
    assert distributed_module.communication_device() == torch.device("cpu")


def test_export_reads_a_bfloat16_checkpoint_as_stored(tmp_path, monkeypatch):
    """`export` has no loading dtype: the folder is read in its own dtype (half float32's memory for bfloat16), and
    f32 GGUF tensors are exactly the saved values."""
    import gguf

    from hf_adapt_pruner import serialization
    from hf_adapt_pruner.gguf_export import export_gguf

    loaded_dtypes = []

    def spy(*args, **kwargs):
        model = load_pruned(*args, **kwargs)
        loaded_dtypes.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(serialization, "load_pruned", spy)

    from tiny_models import BPE_VOCAB, bpe_tokenizer

    tiny_model("llama", vocab_size=BPE_VOCAB).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16")
    bpe_tokenizer().save_pretrained(tmp_path / "bf16")
    export_gguf(tmp_path / "bf16", tmp_path / "m.gguf", dtype="f32")
    assert loaded_dtypes == [torch.bfloat16]
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    expected = base.model.layers[0].mlp.down_proj.weight
    written = torch.from_numpy(tensors["blk.0.ffn_down.weight"].data.copy()).reshape(expected.shape)
    assert torch.equal(written, expected.float())
