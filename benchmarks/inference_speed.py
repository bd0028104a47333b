"""Inference speed of pruned models loaded through `from_pretrained(trust_remote_code=True)`.

For keep ratios 0.8 and 0.6: forward latency over a 128-token prompt and greedy `generate` tokens/s (batch 1, KV
cache), against the original model and the ideal speed-up (the parameter ratio). A second comparison puts a pruned
model with uniform widths, loaded through the written remote code, beside a stock `LlamaForCausalLM` with the same
sizes, to show what the custom code costs.

    python benchmarks/inference_speed.py [--smoke] [--repeats 5] [--new-tokens 32]
"""

from __future__ import annotations

import copy
import tempfile

import torch
from _common import load_model, parser, text_blocks, write
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model, save_pruned
from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.evaluation import generation_speed
from hf_adapt_pruner.pruner import current_layout
from hf_adapt_pruner.remote_code import mark_pruned
from hf_adapt_pruner.surgery import head_rows, prune_layer_


def through_remote_code(model, folder: str):
    save_pruned(model, folder, overwrite=True)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def uniform_pruned(model, keep: float):
    """Keep the first kv groups and MLP channels of every layer: uniform widths that a stock config can express."""
    pruned = copy.deepcopy(model)
    config = pruned.config
    group = config.num_attention_heads // config.num_key_value_heads
    kv = max(1, round(config.num_key_value_heads * keep))
    channels = max(8, round(config.intermediate_size * keep / 8) * 8)
    head_dim = config.head_dim
    for lm in layer_modules(pruned, get_architecture(config.model_type)):
        prune_layer_(lm, head_dim, head_rows(torch.arange(kv), group), torch.arange(kv), torch.arange(channels))
    layout = {"num_attention_heads": [kv * group] * config.num_hidden_layers,
              "num_key_value_heads": [kv] * config.num_hidden_layers,
              "intermediate_size": [channels] * config.num_hidden_layers}  # fmt: skip
    stored = current_layout(model).to_dict()
    stored.update(layout)
    config.pruned_layout = stored
    mark_pruned(pruned)
    sizes = {"num_attention_heads": kv * group, "num_key_value_heads": kv, "intermediate_size": channels}
    stock = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), **sizes, "head_dim": head_dim})).eval()
    stock.load_state_dict(pruned.state_dict())
    return pruned, stock


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer, name = load_model(args.smoke)
    model.eval()
    seq_len = 32 if args.smoke else 128
    calibration, prompt_blocks = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 64, 1)
    prompt = prompt_blocks[:1]  # (1, seq_len)
    base_params = count_parameters(model)
    rows = [
        {"model": "original", "params": base_params, **generation_speed(model, prompt, args.new_tokens, args.repeats)}
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for keep in (0.8, 0.6):
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=keep, inner_steps=3, calibration_samples=8, calibration_seq_len=seq_len)
            prune_model(pruned, config, calibration, progress=False)
            loaded = through_remote_code(pruned, f"{tmp}/adaptive-{keep}")
            rows.append({"model": f"Adapt-Pruner keep {keep} (remote code)", "params": count_parameters(loaded),
                         **generation_speed(loaded, prompt, args.new_tokens, args.repeats)})  # fmt: skip
            uniform, stock = uniform_pruned(model, keep)
            loaded = through_remote_code(uniform, f"{tmp}/uniform-{keep}")
            torch.testing.assert_close(loaded(prompt).logits, stock(prompt).logits)  # same model, two code paths
            for label, m in (("uniform, remote code", loaded), ("uniform, stock LlamaForCausalLM", stock)):
                rows.append({"model": f"{label} keep {keep}", "params": count_parameters(m),
                             **generation_speed(m, prompt, args.new_tokens, args.repeats)})  # fmt: skip
    for row in rows:
        row["param_ratio"] = row["params"] / base_params
        row["forward_speedup"] = rows[0]["forward_ms"] / row["forward_ms"]
        row["generate_speedup"] = row["generate_tokens_per_s"] / rows[0]["generate_tokens_per_s"]
        row["ideal_speedup"] = base_params / row["params"]
    settings = {"prompt_tokens": seq_len, "new_tokens": args.new_tokens, "repeats": args.repeats}
    write("inference_speed", args, {"model": name, **settings, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
