"""GGUF export: llama.cpp (through llama-cpp-python) runs exported tiny models with the logits transformers gives."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import gguf
import pytest
import torch

from hf_adapt_pruner import PrunerConfig, prune_model, save_pruned
from hf_adapt_pruner.gguf_export import export_gguf

from tiny_models import BPE_VOCAB, bpe_tokenizer, calibration_blocks, tiny_model


needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="pip install '.[serve]' (llama-cpp-python)"
)


def model_pair(pruned: bool):
    model = tiny_model("llama", gqa_ratio=3, vocab_size=BPE_VOCAB)  # q/k/v/o biases, tied embeddings
    if pruned:
        config = PrunerConfig(target_ratio=0.6, amplitude=0.2, inner_steps=3, calibration_samples=8, round_to=1)
        prune_model(model, config, calibration_blocks(), progress=False)
        layout = model.config.pruned_layout
        assert len(set(layout["num_attention_heads"])) > 1 or len(set(layout["intermediate_size"])) > 1
    return model


def llama_cpp_logits(path, tokens: list[int]):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    scores = torch.tensor(llm.scores[: len(tokens)])
    llm.close()
    return scores


@needs_llama_cpp
@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_llama_cpp_runs_the_export_with_transformers_logits(pruned, tmp_path):
    model = model_pair(pruned)
    tokens = calibration_blocks(n=1, seq_len=20, seed=4)[0].tolist()
    path = export_gguf(model, tmp_path / "model.gguf", dtype="f32", tokenizer=bpe_tokenizer())
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    actual = llama_cpp_logits(path, tokens)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))  # top-1 identical at every position
    assert (actual - expected).abs().max() < 1e-3


def test_export_writes_per_layer_widths_and_a_tokenizer(tmp_path):
    model = model_pair(pruned=True)
    save_pruned(model, tmp_path / "saved", bpe_tokenizer())
    result = subprocess.run([sys.executable, "-m", "hf_adapt_pruner.cli", "export", str(tmp_path / "saved"), "--gguf",
                             str(tmp_path / "m.gguf"), "--dtype", "q8_0"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    layout = model.config.pruned_layout
    assert fields["general.architecture"].contents() == "deci"
    for key, name in (("num_attention_heads", "head_count"), ("num_key_value_heads", "head_count_kv")):
        values = layout[key]
        written = fields[f"deci.attention.{name}"].contents()
        assert written == (values if len(set(values)) > 1 else values[0])
    assert fields["deci.attention.key_length"].contents() == 8  # explicit head size
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and len(fields["tokenizer.ggml.tokens"].contents())


def test_unsupported_exports_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="q/k RMSNorm"):
        export_gguf(tiny_model("qwen3"), tmp_path / "a.gguf", tokenizer=bpe_tokenizer())
    with pytest.raises(ValueError, match="sliding-window"):
        export_gguf(tiny_model("mistral"), tmp_path / "b.gguf", tokenizer=bpe_tokenizer())
    with pytest.raises(ValueError, match="dtype='q4'"):
        export_gguf(tiny_model("llama"), tmp_path / "c.gguf", dtype="q4")
    assert not list(tmp_path.iterdir())  # nothing half-written
