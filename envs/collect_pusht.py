"""Collect PushT demonstrations with the scripted expert into a Diffusion-Policy-layout replay buffer.

Per step (recorded BEFORE the action is applied, as Diffusion Policy's demo script does):
`state` (5: agent_x, agent_y, block_x, block_y, block_angle), `action` (2, absolute target), `keypoint`
(9, 2: pusht_geometry.block_keypoints(state)), `n_contacts` (1: contacts reported with the current
observation, i.e. during the previous step), and `img` (96, 96, 3 uint8) when `images=True`.
An episode ends at the step whose action reaches success (coverage > 0.95) or after `max_steps`.
"""
from __future__ import annotations

import os
import time

import numpy as np

from envs import pusht_geometry as geo
from pcm_policy.errors import PcmError
from pcm_policy.options import check_int


def _run_episode(env, expert, seed: int, max_steps: int, images: bool):
    obs, info = env.reset(seed=seed)
    expert.reset(seed=seed)
    rows = {"state": [], "action": [], "keypoint": [], "n_contacts": []}
    if images:
        rows["img"] = []
    max_cov = float(info["coverage"])
    success = False
    for _ in range(max_steps):
        state = np.asarray(info["state"], dtype=np.float64)
        action = np.asarray(expert.act(obs), dtype=np.float32)
        rows["state"].append(state.astype(np.float32))
        rows["keypoint"].append(geo.block_keypoints(state).astype(np.float32))
        rows["n_contacts"].append(np.float32([info["n_contacts"]]))
        rows["action"].append(action)
        if images:
            rows["img"].append(env.unwrapped.render_image())
        obs, _, terminated, truncated, info = env.step(action)
        max_cov = max(max_cov, float(info["coverage"]))
        if info["is_success"]:
            success = True
            break
        if terminated or truncated:
            break
    episode = {k: np.stack(v) for k, v in rows.items()}
    return episode, success, max_cov


def collect_pusht(output_path, episodes: int, seed: int = 0, keep_failed: bool = False, images: bool = False,
                  progress: bool = True, max_steps: int = 300, max_attempts: int | None = None,
                  overwrite: bool = False) -> dict:
    """Run the expert on reset seeds seed, seed+1, ... and save the episodes to `output_path` (zarr v2).

    Records `episodes` successful episodes (failures are skipped), or, with `keep_failed`, the first
    `episodes` attempts whatever their outcome. Writes atomically via ReplayBuffer.save (a `.zip` suffix
    gives a zip store). Returns statistics (attempts, successes, success rate, lengths, wall time, seeds).

    Crash-safe and resumable (envs.collect_resume): every finished attempt is kept in `<output>.partial/`
    until the dataset is written, so re-running after a kill continues at the next seed and writes the same
    dataset as an uninterrupted run. An existing complete output of `episodes` episodes is left as it is
    (stats with `already_complete`) unless `overwrite`.
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import gymnasium as gym

    import envs  # noqa: F401  (registers pcm/PushT-v0)
    from pcm_policy.tasks import TASKS
    from envs.collect_resume import EpisodeStore, check_existing_output
    from envs.pusht_expert import PushTExpert
    from pcm_policy.data.replay_buffer import ReplayBuffer

    for key, value, low in (("episodes", episodes, 1), ("seed", seed, 0), ("max_steps", max_steps, 1)):
        check_int(key, value, low)
    if max_attempts is None:
        max_attempts = episodes if keep_failed else 3 * episodes + 20
    existing = check_existing_output(output_path, episodes, overwrite)
    if existing is not None:
        return existing
    store = EpisodeStore(output_path, {"task": "pusht", "seed": seed, "keep_failed": keep_failed, "images": images,
                                       "max_steps": max_steps, "format": 1})
    finished = store.open()
    resumed = store.kept(finished, episodes)  # kept episodes already recorded by an interrupted run
    env = gym.make(TASKS["pusht"].env_id, max_episode_steps=max_steps)
    expert = PushTExpert(env.unwrapped)
    buffer = ReplayBuffer()
    attempts = successes = 0
    lengths, max_covs, kept_seeds, failed_seeds = [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=episodes, initial=resumed, desc="pusht demos", unit="ep")
        if finished:
            bar.write(f"resuming: {resumed} episodes ({len(finished)} attempts) already recorded in {store.dir}")
    t0 = time.perf_counter()
    try:
        while buffer.n_episodes < episodes:
            if attempts >= max_attempts:
                raise PcmError(
                    f"pusht collection: only {buffer.n_episodes} of {episodes} episodes succeeded after "
                    f"{attempts} attempts (seeds {seed}..{seed + attempts - 1})")
            ep_seed = seed + attempts
            if store.has(ep_seed):
                info, episode = store.load(ep_seed)
                success, max_cov = info["success"], info["max_coverage"]
                fresh = False
            else:
                episode, success, max_cov = _run_episode(env, expert, ep_seed, max_steps, images)
                kept = bool(success or keep_failed)
                store.save(ep_seed, {"success": bool(success), "max_coverage": float(max_cov), "kept": kept},
                           episode if kept else None)
                fresh = True
            attempts += 1
            successes += int(success)
            max_covs.append(max_cov)
            if not success:
                failed_seeds.append(ep_seed)
            if success or keep_failed:
                buffer.add_episode(episode)
                lengths.append(len(episode["action"]))
                kept_seeds.append(ep_seed)
            if bar is not None and fresh:
                bar.set_postfix(attempts=attempts, success=f"{successes / attempts:.0%}", resumed=resumed,
                                refresh=False)
                bar.update(int(success or keep_failed))
        buffer.save(output_path)
        store.finish()
    finally:
        if bar is not None:
            bar.close()
        env.close()
    wall = time.perf_counter() - t0
    lengths_arr = np.asarray(lengths)
    return {
        "output_path": str(output_path),
        "episodes": buffer.n_episodes,
        "steps": buffer.n_steps,
        "attempts": attempts,
        "successes": successes,
        "success_rate": successes / attempts,
        "mean_max_coverage": float(np.mean(max_covs)),
        "mean_length": float(lengths_arr.mean()),
        "min_length": int(lengths_arr.min()),
        "max_length": int(lengths_arr.max()),
        "wall_time_s": wall,
        "seeds": kept_seeds,
        "failed_seeds": failed_seeds,
        "resumed_episodes": resumed,
    }


def collect_task(task, output_path, episodes: int, seed: int = 0, keep_failed: bool = False, max_steps: int = 300,
                 overwrite: bool = False, images: bool = False, progress: bool = True) -> dict:
    """The task registry's collector entry point for PushT (`collect_pusht` with the task's settings).

    Args:
        task: the registered `pcm_policy.tasks.Task` (PushT).
        output_path, episodes, seed, keep_failed, max_steps, overwrite, images, progress: see `collect_pusht`.
    """
    return collect_pusht(output_path, episodes, seed=seed, keep_failed=keep_failed, images=images, progress=progress,
                         max_steps=max_steps, overwrite=overwrite)
