"""Tiny random models of every supported model_type, built from configs inside the tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM


MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"]
VOCAB = 128
# What each type adds to the common tiny config, so the tests exercise what sets it apart from Llama.
TYPE_OVERRIDES = {
    "llama": {"attention_bias": True},  # q/k/v/o biases
    "mistral": {"sliding_window": 4},  # shorter than the test sequences
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},  # some layers slide
    "gemma2": {"head_dim": 12, "query_pre_attn_scalar": 10, "sliding_window": 4},  # head_dim != hidden / heads
    "gemma3_text": {"head_dim": 12, "query_pre_attn_scalar": 10, "sliding_window": 4, "attn_logit_softcapping": 20.0},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.1,
        "logits_scaling": 4.0,
    },
}
TIED = ("llama", "qwen3", "gemma2", "gemma3_text")


def tiny_config(model_type: str, gqa_ratio: int = 3, layers: int = 3, **overrides):
    """hidden 48, 6 query heads of head_dim 8 (12 for Gemma), `6 / gqa_ratio` kv heads, intermediate 96."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=6 // gqa_ratio,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=model_type in TIED,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(TYPE_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, gqa_ratio: int = 3, seed: int = 0, attn_implementation: str = "eager", **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, gqa_ratio, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():  # larger-than-default random weights so layers differ measurably
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "norm" in name:  # random norm weights, so slicing a full-width norm (OLMo 2) is checked
                param.uniform_(0.5, 1.5)
    return model.eval()


def calibration_blocks(n: int = 16, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=generator)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (`w3 ... w127`), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


BPE_VOCAB = 320


def bpe_tokenizer():
    """A byte-level BPE tokenizer of at most BPE_VOCAB entries trained offline (the kind Llama-family models use)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer()
    text = ["the pruned model runs in llama cpp with its own widths per layer"] * 20
    backend.train_from_iterator(text, vocab_size=BPE_VOCAB, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def pruned_tiny_model(model_type: str = "llama", gqa_ratio: int = 3, ratio: float = 0.6, **config_overrides):
    from hf_adapt_pruner import PrunerConfig, prune_model

    model = tiny_model(model_type, gqa_ratio)
    config = PrunerConfig(target_ratio=ratio, amplitude=0.1, inner_steps=2, calibration_samples=8, round_to=1,
                          **config_overrides)  # fmt: skip
    prune_model(model, config, calibration_blocks(), progress=False)
    return model
