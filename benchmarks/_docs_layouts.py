"""The docs' layout sections: what one width for every layer (`layout="uniform"`) costs, one-shot and in the main
job, and how each layout decodes in llama.cpp."""

from __future__ import annotations

from pathlib import Path

from _docs_common import main_job_comparison, note, originals, seeds, sources


def uniform_one_shot_section(uniform: dict, adaptive: list[dict]) -> list[str]:
    """`uniform`: a one_shot_quality result of the "uniform layout" mode; `adaptive`: reconstruction results, whose
    least_squares rows at the same damping are the adaptive layout at the same defaults, calibration and held-out
    sets."""
    names = sources(uniform)
    damping = uniform["defaults"]["reconstruction_damping"]
    rows = {"adaptive": [r for result in adaptive for r in result["rows"][1:]
                         if r["mode"] == "least_squares" and r["damping"] == damping],
            "uniform": [r for r in uniform["rows"][1:] if r["mode"] == "uniform layout"]}  # fmt: skip
    ratios = sorted({r["ratio"] for r in rows["uniform"]}, reverse=True)
    lines = ["## Uniform against adaptive layout, one-shot", "",
             f"SmolLM2-135M-Instruct pruned once with least-squares reconstruction at damping {damping:g} (float32 "
             "scoring passes, defaults otherwise), with `layout=\"adaptive\"` and `\"uniform\"`, from the same "
             "calibration sample per seed. "
             f"Held-out perplexity on {uniform['eval_tokens']:,} tokens of each source: python3.11-doc files never "
             f"calibrated on ({names[0]}) and git-doc ({names[1]}), original: {originals(uniform)}; mean (each "
             f"seed). {note(uniform)}", "",
             "| keep | layout | parameters | " + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---:|---|---:|" + "---:|" * len(names)]  # fmt: skip
    for ratio in ratios:
        for layout, group in rows.items():
            group = [r for r in group if r["ratio"] == ratio]
            if group:
                cells = " | ".join(seeds(group, f"ppl {n}") for n in names)
                lines.append(f"| {ratio} | {layout} | {group[0]['params']:,} | {cells} |")
    return [*lines, ""]


def uniform_main_job_section(result: dict, docs: Path) -> list[str]:
    return main_job_comparison(result, "Uniform against adaptive layout in the main job",
                               "Taylor scores from the training gradients")  # fmt: skip
