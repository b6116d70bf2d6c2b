import numpy as np
import pytest

from pcm_policy.data.sequence_sampler import SequenceSampler, split_episodes


def _windows(sampler, arrays):
    return [sampler.sample(arrays, i) for i in range(len(sampler))]


def test_padding_at_both_episode_edges_matches_hand_computed_windows():
    # episodes [0, 1, 2] and [3, 4, 5, 6]; each frame's value is its global index
    ends = np.array([3, 7])
    data = {"x": np.arange(7)}
    s = SequenceSampler(ends, sequence_length=4, pad_before=1, pad_after=2)
    got = [w["x"].tolist() for w in _windows(s, data)]
    assert got == [
        [0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2],                 # episode 0: starts -1, 0, 1
        [3, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 6], [5, 6, 6, 6],   # episode 1: starts -1 .. 2
    ]
    assert len(s) == 7


def test_diffusion_policy_pusht_setting_counts_windows():
    # horizon 16, To 2, Ta 8 -> pad_before 1, pad_after 7: an episode of L steps gives L - 16 + 7 + 1 + 1 windows
    ends = np.cumsum([20, 30])
    s = SequenceSampler(ends, 16, pad_before=1, pad_after=7)
    assert len(s) == (20 - 16 + 7 + 2) + (30 - 16 + 7 + 2)
    first = s.sample({"x": np.arange(50)}, 0)["x"]
    assert first.tolist() == [0] + list(range(15))
    last = s.sample({"x": np.arange(50)}, len(s) - 1)["x"]
    assert last.tolist() == list(range(41, 50)) + [49] * 7


def test_no_windows_never_cross_episodes_and_no_padding_case():
    ends = np.array([5, 11])
    s = SequenceSampler(ends, 3)
    got = [w["x"].tolist() for w in _windows(s, {"x": np.arange(11)})]
    assert got == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [5, 6, 7], [6, 7, 8], [7, 8, 9], [8, 9, 10]]


def test_multidim_arrays_and_several_keys_are_cut_together():
    ends = np.array([2, 5])
    kp = np.arange(5 * 3 * 2).reshape(5, 3, 2).astype(np.float32)
    act = np.arange(10).reshape(5, 2)
    s = SequenceSampler(ends, 3, pad_before=2, pad_after=0)
    w = s.sample({"kp": kp, "act": act}, 0)  # episode 0 starting at -2: frames [0, 0, 0]
    assert w["kp"].shape == (3, 3, 2) and w["kp"].dtype == np.float32
    np.testing.assert_array_equal(w["kp"], kp[[0, 0, 0]])
    np.testing.assert_array_equal(w["act"], act[[0, 0, 0]])
    w = s.sample({"kp": kp, "act": act}, 1)
    np.testing.assert_array_equal(w["act"], act[[0, 0, 1]])


def test_short_episode_yields_no_window_and_padding_is_clipped():
    ends = np.array([2, 10])
    s = SequenceSampler(ends, 6)
    assert len(s) == 3 and s.indices[:, 0].min() == 2
    s = SequenceSampler(np.array([4]), 4, pad_before=10, pad_after=10)
    assert (s.pad_before, s.pad_after) == (3, 3)
    assert len(s) == 4 + 3 + 3 - 4 + 1


def test_episode_mask_selects_episodes():
    ends = np.array([3, 6, 9])
    s = SequenceSampler(ends, 2, episode_mask=np.array([False, True, False]))
    got = [w["x"].tolist() for w in _windows(s, {"x": np.arange(9)})]
    assert got == [[3, 4], [4, 5]]
    with pytest.raises(ValueError, match="episode_mask"):
        SequenceSampler(ends, 2, episode_mask=np.array([True, False]))


def test_split_is_deterministic_disjoint_and_sized_like_diffusion_policy():
    tr, va = split_episodes(206, 0.02, seed=42)
    tr2, va2 = split_episodes(206, 0.02, seed=42)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert va.sum() == 4 and tr.sum() == 202 and not np.any(tr & va)
    _, va3 = split_episodes(206, 0.02, seed=43)
    assert not np.array_equal(va, va3)


def test_split_edge_cases():
    tr, va = split_episodes(10, 0.0, seed=0)
    assert tr.all() and not va.any()
    tr, va = split_episodes(3, 0.01, seed=0)  # round(0.03) = 0 but val_ratio > 0: at least one
    assert va.sum() == 1 and tr.sum() == 2
    tr, va = split_episodes(1, 0.5, seed=0)  # a single episode always trains
    assert tr.tolist() == [True] and va.tolist() == [False]
    tr, va = split_episodes(2, 0.9, seed=0)  # never takes every episode for validation
    assert tr.sum() == 1 and va.sum() == 1
    with pytest.raises(ValueError):
        split_episodes(5, 1.0)


def test_max_train_episodes_subsamples_with_the_seed():
    tr, va = split_episodes(206, 0.02, seed=42, max_train_episodes=90)
    assert tr.sum() == 90 and va.sum() == 4 and not np.any(tr & va)
    tr2, _ = split_episodes(206, 0.02, seed=42, max_train_episodes=90)
    np.testing.assert_array_equal(tr, tr2)
    tr3, _ = split_episodes(206, 0.02, seed=42, max_train_episodes=500)
    assert tr3.sum() == 202
