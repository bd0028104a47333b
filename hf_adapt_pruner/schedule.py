"""The Adapt-Accel schedule: when each prune event happens and what parameter count it targets. Pure functions.

With `S = max_steps`, `R = round(recovery_fraction * S)` recovery steps at the end and a first event at step `W`
(`importance_window` for training-based importance, which needs gradients from `W` steps before the event; 0 for
calibration-based importance), the N events sit at

    e_1 = W,   e_N = S - R,   e_{k+1} - e_k  proportional to  w_k  (k = 1 .. N-1)

so stage k (the training after event k, on the model at stage k's size) lasts ~w_k, and the last stage lasts R.
Shares: `linear` w_k = k (later, smaller stages train longer, as the paper's code), `constant` w_k = 1, `cosine`
w_k = 1 - cos(pi * k / N) (slow start, like linear but flatter at the end).
Stage k's target is `P0 - (P0 - P*) * k / N`.

Worked example: S = 1000, N = 5, W = 8, recovery_fraction = 0.1, linear: R = 100, the 892 steps from 8 to 900 split
1:2:3:4, so events at steps 8, 97, 276, 543, 900. Pruning 134.5 M -> 94.2 M removes 8.07 M at each event.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

from .checks import check_target_below
from .config import PrunerConfig


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    step: int  # global step after which the event runs (0 = before the first step)
    target_params: int

    def to_dict(self) -> dict:
        return asdict(self)


def stage_weights(num_stages: int, split: str) -> list[float]:
    """Relative lengths w_1 .. w_{N-1} of the stages between events."""
    ks = range(1, num_stages)
    if split == "linear":
        return [float(k) for k in ks]
    if split == "constant":
        return [1.0 for _ in ks]
    return [1.0 - math.cos(math.pi * k / num_stages) for k in ks]


def build_schedule(
    config: PrunerConfig, max_steps: int, start_params: int, final_target: int, original_params: int | None = None
) -> list[Stage]:
    """The prune events of a run; raises `ValueError` naming the fix when they do not fit in `max_steps`, or when
    the target is not below `start_params` (`original_params`: the unpruned model's count, for the message)."""
    n = config.num_stages
    check_target_below(final_target, start_params, original_params or start_params)
    steps = event_steps(config, max_steps)
    if steps is None:
        needed = fewest_steps(config, max_steps)
        fix = f"Train for at least {needed} steps" if needed else "Lower recovery_fraction"
        raise ValueError(
            f"num_stages={n} prune events do not fit in max_steps={max_steps}: with importance_window="
            f"{config.importance_window} (importance_source={config.importance_source!r}), recovery_fraction="
            f"{config.recovery_fraction} and data_split={config.data_split!r} each event needs a step of its own. "
            f"{fix} or use fewer stages."
        )
    drop = start_params - final_target
    return [Stage(k + 1, step, round(start_params - drop * (k + 1) / n)) for k, step in enumerate(steps)]


def event_steps(config: PrunerConfig, max_steps: int) -> list[int] | None:
    """The global steps of the `num_stages` events in a run of `max_steps`, or None when they do not fit (two events
    on one step, or an event after the last step)."""
    n = config.num_stages
    first = config.importance_window if config.importance_source == "training" else 0
    last = max_steps - round(config.recovery_fraction * max_steps)
    if n == 1:
        steps = [first]
    else:
        weights = stage_weights(n, config.data_split)
        cumulative = [sum(weights[:k]) / sum(weights) for k in range(n)]
        steps = [first + round((last - first) * c) for c in cumulative]
    if max_steps < 1 or steps[-1] > max_steps or first > last or any(b <= a for a, b in itertools.pairwise(steps)):
        return None
    return steps


def fewest_steps(config: PrunerConfig, too_few: int) -> int | None:
    """The smallest `max_steps` above `too_few` whose events fit (more steps only widen the gaps), or None when even
    2^40 steps do not: doubling, then bisection."""
    low, high = max(too_few, 0), max(too_few, 1)
    while event_steps(config, high) is None:
        low, high = high, high * 2
        if high > 1 << 40:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if event_steps(config, mid) is None else (low, mid)
    return high
