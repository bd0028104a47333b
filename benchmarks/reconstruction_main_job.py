"""Reconstruction in the main job: Adapt-Accel with distillation, with and without the least-squares refit.

SmolLM2-135M -> keep 0.7 in 10 prune events over 80 steps of 4 x 128 tokens of python3.11-doc (WSD learning rate
2e-4, distillation alpha 0.5 at T = 1, Taylor scores from the training gradients), for each seed (data order):
`reconstruction="none"`, and `"least_squares"` (Gram matrices from the importance window's training steps: no extra
pass) at damping 0.01 and 0.1, the latter also with the optimizer state of the refit weights dropped after each event
(`_main_job.ResetRefitState`) instead of kept. Each run is measured as `_main_job.py` describes (held-out perplexity
in the training domain and on git-doc, a zero-shot cloze task on git-doc prose, times, peak memory).

    python benchmarks/reconstruction_main_job.py [--smoke] [--seeds 0 1] [--jobs 1] [--variants LABEL ...]
        [--reuse RESULT.json ...]
"""

from _main_job import compare


REFIT = {"reconstruction": "least_squares"}
VARIANTS = {
    "none": {"reconstruction": "none"},
    "least_squares, damping 0.01": {**REFIT, "reconstruction_damping": 0.01},
    "least_squares, damping 0.1": {**REFIT, "reconstruction_damping": 0.1},
    "least_squares, damping 0.1, optimizer state reset": {**REFIT, "reconstruction_damping": 0.1,
                                                           "reset_refit_state": True},
}  # fmt: skip


if __name__ == "__main__":
    compare("reconstruction_main_job", __doc__.split("\n")[0], VARIANTS)
