"""The servable layout in the main job: Adapt-Accel with distillation, adaptive against uniform widths.

SmolLM2-135M -> keep 0.7 in 10 prune events over 80 steps of 4 x 128 tokens of python3.11-doc (WSD learning rate
2e-4, distillation alpha 0.5 at T = 1, Taylor scores from the training gradients), once with `layout="adaptive"`
(each layer its own widths) and once with `layout="uniform"` (one width for every layer: saved as the stock
architecture), for each seed (data order). Each run is measured as `_main_job.py` describes (held-out perplexity in
the training domain and on git-doc, a zero-shot cloze task on git-doc prose, times, peak memory).

    python benchmarks/uniform_main_job.py [--smoke] [--seeds 0 1] [--jobs 1] [--reuse RESULT.json ...]
"""

from _main_job import compare


if __name__ == "__main__":
    compare(
        "uniform_main_job",
        __doc__.split("\n")[0],
        {"adaptive": {"layout": "adaptive"}, "uniform": {"layout": "uniform"}},
    )
