"""What each layout saves: SmolLM2-135M pruned once to keep 0.7 with layout="adaptive" and layout="uniform", saved with
save_pruned; the files written, the sizes of config.json and pruning_history.json, and whether the folder loads with a
plain `AutoModelForCausalLM.from_pretrained(folder)` (trust_remote_code=False, in a new process where hf_adapt_pruner
cannot be imported: tests/fresh_load.py) with the logits the pruned model gives.

Scores are magnitudes (no backward pass): the files' sizes depend on how many units are kept, not on which.

    python benchmarks/layout_files.py [--smoke]
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model, save_pruned


def plain_load(folder: Path, prompt: torch.Tensor, expected: torch.Tensor) -> dict:
    """What a user with only transformers (no remote code, no hf_adapt_pruner) gets from the folder."""
    script = Path(__file__).resolve().parents[1] / "tests" / "fresh_load.py"
    result = subprocess.run([sys.executable, str(script), str(folder), json.dumps(prompt.tolist()), "plain"],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    if result.returncode != 0:
        return {"plain_load_error": result.stderr.strip().splitlines()[-1][:300]}
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])["logits"])
    return {"plain_load_max_logit_diff": float((logits - expected).abs().max())}


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 64, 1)
    budget = {"inner_steps": 2, "calibration_samples": 4} if args.smoke else {}
    rows = []
    for layout in ("adaptive", "uniform"):
        pruned = copy.deepcopy(model)
        config = PrunerConfig(target_ratio=0.7, layout=layout, group_importance="magnitude",
                              calibration_seq_len=seq_len, **budget)  # fmt: skip
        prune_model(pruned, config, calibration, progress=False)
        prompt = calibration[:1, :16]
        with torch.no_grad():
            expected = pruned(prompt).logits
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_pruned(pruned, Path(tmp) / layout, tokenizer)
            saved = json.loads((folder / "config.json").read_text())
            row = {"layout": layout, "params": count_parameters(pruned), "model_type": saved["model_type"],
                   "files": sorted(p.name for p in folder.iterdir()),
                   "config_json_bytes": (folder / "config.json").stat().st_size,
                   "history_json_bytes": (folder / "pruning_history.json").stat().st_size,
                   "widths": sorted({tuple(w) for w in zip(*(saved["pruned_layout"][k] for k in (
                       "num_attention_heads", "num_key_value_heads", "intermediate_size")))})}  # fmt: skip
            row.update(plain_load(folder, prompt, expected))
        rows.append(row)
        print(row, flush=True)
    write("layout_files", args, {"model": name, "rows": rows})


if __name__ == "__main__":
    main()
