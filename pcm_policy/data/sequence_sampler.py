"""Training windows over a replay buffer, with Diffusion Policy's edge padding, and the train/val split.

A window of `sequence_length` frames may start up to `pad_before` frames before an episode and end up to
`pad_after` frames after it; the missing frames repeat the episode's first / last frame. This lets the policy
learn the first action of an episode (with an observation history padded by the first frame) and the last
actions (the chunk runs past the end).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from pcm_policy.options import check_int


class SequenceSampler:
    """Index of all windows; `sample(arrays, i)` cuts window i out of per-step arrays.

    Windows of the masked episodes, in episode order; within an episode they start at every frame from
    -pad_before to len - sequence_length + pad_after (an episode too short for that yields none).

    Args:
        episode_ends: exclusive cumulative episode ends (E,) int.
        sequence_length: frames per window (>= 1).
        pad_before, pad_after: frames a window may extend before / after its episode, clipped to
            [0, sequence_length - 1].
        episode_mask: (E,) bool, the episodes to draw windows from; None = all.

    Attributes:
        sequence_length, pad_before, pad_after: as used (padding clipped).
        episode_ends: (E,) int64.
        episode_mask: (E,) bool.
        indices: (W, 4) int64 rows (buffer_start, buffer_end, sample_start, sample_end): buffer rows
            [buffer_start, buffer_end) fill window frames [sample_start, sample_end).

    Raises:
        ValueError: sequence_length < 1, or `episode_mask` not of shape (E,).
    """

    def __init__(self, episode_ends, sequence_length: int, pad_before: int = 0, pad_after: int = 0,
                 episode_mask=None):
        ends = np.asarray(episode_ends, dtype=np.int64)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        # Padding a whole window or more would yield windows with no real frame: clip as Diffusion Policy does.
        pad_before = min(max(int(pad_before), 0), sequence_length - 1)
        pad_after = min(max(int(pad_after), 0), sequence_length - 1)
        if episode_mask is None:
            episode_mask = np.ones(len(ends), dtype=bool)
        episode_mask = np.asarray(episode_mask, dtype=bool)
        if episode_mask.shape != ends.shape:
            raise ValueError(f"episode_mask has shape {episode_mask.shape}, expected {ends.shape}")
        self.sequence_length = sequence_length
        self.pad_before, self.pad_after = pad_before, pad_after
        self.episode_ends = ends
        self.episode_mask = episode_mask
        self.indices = self._make_indices(ends, episode_mask, sequence_length, pad_before, pad_after)

    @staticmethod
    def _make_indices(ends, mask, seq_len, pad_before, pad_after) -> np.ndarray:
        """Rows (buffer_start, buffer_end, sample_start, sample_end): buffer[bs:be] fills window[ss:se]."""
        starts = np.concatenate([[0], ends[:-1]])
        rows = []
        for ep in np.nonzero(mask)[0]:
            ep_start, ep_len = starts[ep], ends[ep] - starts[ep]
            # window start relative to the episode: -pad_before .. ep_len - seq_len + pad_after (inclusive)
            rel = np.arange(-pad_before, ep_len - seq_len + pad_after + 1)
            if rel.size == 0:
                continue
            b_start = np.maximum(rel, 0)
            b_end = np.minimum(rel + seq_len, ep_len)
            rows.append(np.stack([b_start + ep_start, b_end + ep_start, b_start - rel, b_end - rel], axis=1))
        if not rows:
            return np.zeros((0, 4), dtype=np.int64)
        return np.concatenate(rows).astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, arrays: Mapping[str, np.ndarray], idx: int) -> dict[str, np.ndarray]:
        """Window `idx` of every per-step array.

        Args:
            arrays: name -> array (N, ...) over the whole buffer (any array supporting slicing).
            idx: window index in [-W, W).

        Returns:
            name -> (sequence_length, ...) in the array's dtype; missing frames repeat the episode's first /
            last frame. An unpadded window is a view of the input (do not modify it), a padded one a new array.

        Raises:
            IndexError: `idx` out of range.
        """
        bs, be, ss, se = self.indices[idx]
        out = {}
        for key, arr in arrays.items():
            chunk = np.asarray(arr[bs:be])
            if ss == 0 and se == self.sequence_length:
                out[key] = chunk
                continue
            window = np.empty((self.sequence_length, *chunk.shape[1:]), dtype=chunk.dtype)
            window[:ss] = chunk[0]
            window[ss:se] = chunk
            window[se:] = chunk[-1]
            out[key] = window
        return out


def split_episodes(n_episodes: int, val_ratio: float, seed: int = 42,
                   max_train_episodes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random episode-level split -> (train_mask, val_mask), boolean (n_episodes,), disjoint.

    Validation gets round(n * val_ratio) episodes, at least 1 when val_ratio > 0, but always leaves one
    for training. `max_train_episodes` then keeps a seeded random subset of the training episodes
    (Diffusion Policy trains PushT on 90 of 206 episodes this way).

    Raises:
        ValueError: n_episodes < 0, val_ratio outside [0, 1), or max_train_episodes < 1.
    """
    if n_episodes < 0:
        raise ValueError(f"n_episodes must be >= 0, got {n_episodes}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        val_mask[np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)] = True
    train_mask = ~val_mask
    if max_train_episodes is not None:
        if max_train_episodes < 1:
            raise ValueError(f"max_train_episodes must be >= 1, got {max_train_episodes}")
        train_idx = np.nonzero(train_mask)[0]
        if len(train_idx) > max_train_episodes:
            keep = np.random.default_rng(seed).choice(train_idx, size=max_train_episodes, replace=False)
            train_mask = np.zeros(n_episodes, dtype=bool)
            train_mask[keep] = True
    return train_mask, val_mask


def check_window(horizon, n_obs_steps, n_action_steps, key: str = "policy") -> None:
    """The window shape of a policy: H frames, of which the To observations and the Ta executed actions
    [To-1, To-1+Ta) must fit (Diffusion Policy's convention).

    Args:
        horizon: H.
        n_obs_steps: To, in [1, H].
        n_action_steps: Ta, with To - 1 + Ta <= H.
        key: the config group the three options belong to, for messages (`<key>.horizon`, ...).

    Raises:
        ConfigError: a value that is not an integer in its range, naming its key.
    """
    horizon = check_int(f"{key}.horizon", horizon, 1)
    n_obs = check_int(f"{key}.n_obs_steps", n_obs_steps, 1, horizon)
    check_int(f"{key}.n_action_steps", n_action_steps, 1, horizon - n_obs + 1,
              why=f" (n_obs_steps - 1 + n_action_steps must fit in horizon={horizon})")

