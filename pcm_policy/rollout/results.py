"""One episode's result and the summary over episodes (success rate with its Wilson interval, score).

Shared by `pcm eval`, `pcm bench` and `pcm demo`. Scores follow the task registry (Diffusion Policy's convention):
PushT = mean over episodes of clip(max coverage / 0.95, 0, 1), success = max coverage >= 0.95; robomimic: score
= success rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pcm_policy.tasks import get_task


@dataclass
class EpisodeResult:
    """One finished episode.

    Attributes:
        episode: index of the episode within its run (0-based).
        seed: the seed its env was reset with.
        success: the task was solved at some step.
        max_coverage: PushT only (else None): the largest block/goal coverage reached, in [0, 1].
        steps: env (control) steps taken.
    """

    episode: int
    seed: int
    success: bool
    max_coverage: float | None
    steps: int

    def score(self, task: str) -> float:
        """The episode's score in [0, 1] as its task scores it (`pcm_policy.tasks.Task.episode_score`).

        Args:
            task: the task name (PushT scores clip(max coverage / 0.95, 0, 1); robomimic tasks, or a result
                without coverage, 1.0 on success, else 0.0).

        Raises:
            ConfigError: an unknown task.
        """
        return get_task(task).episode_score(self.success, self.max_coverage)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval for a success rate of `successes` out of `n` trials.

    Wilson (1927), JASA 22:209: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = successes/n.
    Unlike the normal approximation it stays within [0, 1] and is not empty at 0 or n successes.

    Returns:
        (low, high), both in [0, 1]; (0, 1) for n = 0.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # mathematically lo <= p <= hi (with equality at 0 and n successes); keep it so under rounding
    return max(0.0, min(p, (centre - half) / denom)), min(1.0, max(p, (centre + half) / denom))


def summarize(results: list[EpisodeResult], task: str) -> dict[str, Any]:
    """Summary over episodes.

    Args:
        results: the episodes, in order.
        task: the task name (selects the score, see `EpisodeResult.score`).

    Returns:
        {"episodes", "success_rate", "success_ci95" ([low, high], Wilson), "score" (means in [0, 1]),
        "steps" (total env steps), "seed_range"
        ([first, last] seed)} and, when any episode has a coverage (PushT), "mean_max_coverage". An empty list
        gives zero rates and an empty seed range.
    """
    n = len(results)
    successes = int(sum(r.success for r in results))
    out = {
        "episodes": n,
        "success_rate": successes / n if n else 0.0,
        "success_ci95": list(wilson_interval(successes, n)),
        "score": float(np.mean([r.score(task) for r in results])) if n else 0.0,
        "steps": int(sum(r.steps for r in results)),
        "seed_range": [results[0].seed, results[-1].seed] if n else [],
    }
    covs = [r.max_coverage for r in results if r.max_coverage is not None]
    if covs:
        out["mean_max_coverage"] = float(np.mean(covs))
    return out
