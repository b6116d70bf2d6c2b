"""The summary over episodes: success rate with its Wilson score interval, score."""
import pytest

from pcm_policy.rollout.results import EpisodeResult, summarize, wilson_interval


@pytest.mark.parametrize("k,n,lo,hi", [(19, 50, 0.2586, 0.5185), (24, 50, 0.3480, 0.6149), (0, 10, 0.0, 0.2775),
                                       (10, 10, 0.7225, 1.0), (1, 1, 0.2065, 1.0), (50, 100, 0.4038, 0.5962)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


def test_summary_carries_the_interval():
    results = [EpisodeResult(i, 100000 + i, i < 19, None, 10) for i in range(50)]
    s = summarize(results, "lift")
    assert s["success_rate"] == 0.38 and s["success_ci95"] == pytest.approx([0.2586, 0.5185], abs=1e-4)
    assert summarize([], "lift")["success_ci95"] == [0.0, 1.0]
