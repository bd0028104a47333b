"""GGUF export for llama.cpp (and Ollama, LM Studio, llama-cpp-python): per-layer widths through the `deci`
architecture, whose head counts and feed-forward length may be one number per layer.

llama.cpp's `deci` graph is a Llama block (RMSNorm, rotary attention with optional q/k/v/o biases, SwiGLU MLP) whose
layer `i` has `deci.attention.head_count[i]` query heads, `deci.attention.head_count_kv[i]` key/value heads and
`deci.feed_forward_length[i]` MLP channels. Models whose blocks are exactly that (llama, mistral and qwen2 without
sliding windows) are exported; anything else raises an error naming the feature the graph lacks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import get_architecture, layer_modules
from .checks import check_model
from .remote_code import base_model_type


GGUF_DTYPES = ("f32", "f16", "q8_0")
EXPORTABLE = ("llama", "mistral", "qwen2")
NOT_EXPRESSIBLE = {  # model_type: what llama.cpp's deci graph lacks
    "qwen3": "per-head q/k RMSNorm",
    "olmo2": "q/k RMSNorm over the projections and post-norms",
    "gemma2": "logit soft-capping, GELU-tanh MLP, sandwich norms, scaled embeddings",
    "gemma3_text": "q/k RMSNorm, sandwich norms, GELU-tanh MLP, scaled embeddings, per-layer rope bases",
    "phi3": "LongRoPE scaling and partial rotary embeddings",
    "granite": "embedding / residual / attention multipliers and logits scaling",
}


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r}: GGUF export writes plain rotary embeddings only (rope_type "
                         "'default'); scaled rope is not exported yet.")  # fmt: skip
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_exportable(model: nn.Module) -> str:
    """The model's base `model_type`, or a ValueError naming what llama.cpp's `deci` graph cannot express."""
    config = model.config
    base = base_model_type(config.model_type)
    if base not in EXPORTABLE:
        missing = NOT_EXPRESSIBLE.get(base, "its block structure")
        raise ValueError(f"model_type {base!r} cannot be exported to GGUF: llama.cpp's deci graph (per-layer widths) "
                         f"has no {missing}. Exportable: {', '.join(EXPORTABLE)}.")  # fmt: skip
    window = getattr(config, "sliding_window", None)
    if base == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None  # qwen2 configs carry a window they do not use
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"sliding_window={window}: llama.cpp's deci graph has no sliding-window attention; "
                         "export a model with full attention.")  # fmt: skip
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: the deci graph runs SwiGLU (silu) MLPs only.")
    _rope_theta(config)
    return base


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary layout (halves) -> llama.cpp's (interleaved pairs), head by head, as llama.cpp's own
    converter does; works on weights (rows) and biases."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tensor_data(tensor: torch.Tensor, dtype: str):
    """(array, raw dtype or None) as the writer wants them: 1-D tensors stay f32 (llama.cpp's norms and biases)."""
    import gguf

    array = tensor.detach().cpu().to(torch.float32).numpy()  # to the host first: no float32 copy on the GPU
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:  # q8_0 blocks of 32 along rows; keep odd-width tensors in f16
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _per_layer(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def _copy_tokenizer_from_gguf(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), value_type)


def _add_hf_tokenizer(writer, tokenizer: Any, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE tokenizer (the Llama-family models here use one) as GGUF metadata."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.BpeVocab(Path(tmp))
        except FileNotFoundError:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}) is not a byte-level BPE tokenizer; GGUF export converts "
                "those only. Pass tokenizer=<path to a GGUF file of the base model> to copy its tokenizer."
            ) from None
        tokens, types = [], []
        for text, _, token_type in vocab.all_tokens():
            tokens.append(text)
            types.append(token_type)
        for extra in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer's vocabulary
            tokens.append(f"[PAD{extra}]".encode())
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def export_gguf(
    model_or_dir: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    dtype: str = "f16",
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a pruned (or unpruned) Llama-family model as a GGUF file that llama.cpp runs with its per-layer widths.

    Args:
        model_or_dir: a model (on any device, in any dtype), or a folder saved with `save_pruned` /
            `save_pretrained` (its tokenizer is used), read on the CPU in the dtype its weights are stored in. Each
            tensor is converted to `dtype` from there, so no loading dtype or device is needed.
        path: the `.gguf` file to write (written to a temporary file beside it, then renamed).
        dtype: `f32`, `f16` (2-D weights; norms and biases stay f32) or `q8_0` (2-D weights whose rows are a multiple
            of 32 long; others f16).
        tokenizer: a byte-level BPE `transformers` tokenizer (converted), or the path of a GGUF file whose tokenizer
            metadata is copied (the file the model was loaded from). Default: the tokenizer of `model_or_dir` when it
            is a folder, else the GGUF file `load_for_pruning` loaded the model from.
        overwrite: replace an existing file.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(GGUF_DTYPES)}.")
    target = Path(path).absolute()
    if target.is_dir():
        raise IsADirectoryError(
            f"path={str(target)!r} is a folder: give the .gguf file to write, e.g. {str(target / 'model.gguf')!r}."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists: pass overwrite=True, or choose another path.")
    if isinstance(tokenizer, (str, os.PathLike)) and not Path(tokenizer).is_file():
        raise FileNotFoundError(
            f"tokenizer={str(tokenizer)!r}: no such GGUF file to copy the tokenizer from. Pass the .gguf file the "
            "model was loaded from, or a transformers tokenizer object."
        )
    model = model_or_dir
    if isinstance(model, nn.Module):
        check_model(model, "export_gguf")
    else:
        from transformers import AutoTokenizer

        from .serialization import load_pruned

        folder = Path(model_or_dir)
        model = load_pruned(folder, dtype="auto")  # as stored: lossless, and half the memory of float32 for bf16
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer is None:
        tokenizer = getattr(model, "_hf_adapt_pruner_gguf_source", None)
    if tokenizer is None:
        raise ValueError("GGUF files carry their tokenizer: pass tokenizer= (a transformers tokenizer, or the GGUF "
                         "file the model came from).")  # fmt: skip
    base = check_exportable(model)
    config = model.config
    if not isinstance(tokenizer, (str, os.PathLike)) and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size} "
            "(embedding rows): llama.cpp would look up ids the model lacks. Pass the tokenizer the model was trained "
            "with (or resize the embeddings to len(tokenizer) before pruning)."
        )
    spec = get_architecture(base)
    layers = layer_modules(model, spec)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    widths = [lm.widths(head_dim) for lm in layers]
    if any(lm.live is not None for lm in layers) or getattr(config, "pruned_mask", None) is not None:
        raise ValueError("The model carries masks (mode='mask'): save_pruned it first and export the saved folder.")

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "deci")
        writer.add_name(Path(str(getattr(config, "name_or_path", "") or "pruned")).name or "pruned")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(len(layers))
        writer.add_feed_forward_length(_per_layer([w[2] for w in widths]))
        writer.add_head_count(_per_layer([w[0] for w in widths]))
        writer.add_head_count_kv(_per_layer([w[1] for w in widths]))
        writer.add_key_length(head_dim)  # explicit: llama.cpp would derive it from hidden / layer 0's heads
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])  # fmt: skip
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if isinstance(tokenizer, (str, os.PathLike)):
            _copy_tokenizer_from_gguf(writer, Path(tokenizer))
        else:
            _add_hf_tokenizer(writer, tokenizer, config.vocab_size)

        for name, tensor in _tensors(model, layers, widths, spec):
            array, raw_dtype = _tensor_data(tensor, dtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it private)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _tensors(model: nn.Module, layers, widths, spec):
    """(GGUF name, tensor) in llama.cpp's naming and row order."""
    inner = model.get_submodule(spec.layers.rsplit(".", 1)[0])  # the decoder (model.model)
    yield "token_embd.weight", inner.embed_tokens.weight
    yield "output_norm.weight", inner.norm.weight
    output = model.get_output_embeddings().weight
    if output is not inner.embed_tokens.weight:  # tied: llama.cpp reuses token_embd
        yield "output.weight", output
    for i, (lm, (heads, kv_heads, _)) in enumerate(zip(layers, widths)):
        a, m, layer = lm.attention, lm.mlp, lm.layer
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        modules = [
            ("attn_q", getattr(a, spec.q_proj), heads),  # rotary heads: q and k rows follow llama.cpp's order
            ("attn_k", getattr(a, spec.k_proj), kv_heads),
            ("attn_v", getattr(a, spec.v_proj), 0),
            ("attn_output", getattr(a, spec.o_proj), 0),
            ("ffn_gate", getattr(m, spec.gate_proj), 0),
            ("ffn_up", getattr(m, spec.up_proj), 0),
            ("ffn_down", getattr(m, spec.down_proj), 0),
        ]
        for gguf_name, linear, rotary_heads in modules:
            for kind in ("weight", "bias"):
                tensor = getattr(linear, kind)
                if tensor is not None:
                    yield (
                        f"blk.{i}.{gguf_name}.{kind}",
                        _permute_rotary(tensor, rotary_heads) if rotary_heads else tensor,
                    )
