"""Collect scripted-expert demonstrations for robomimic Lift / PickPlaceCan into a robomimic low-dim hdf5.

Each episode resets the env with seed ``seed + i`` (robosuite's random placement), runs the scripted expert
(:mod:`envs.robomimic_expert`) and records, per step, the observation before the action (``obs``), after it
(``next_obs``), the 7-d delta action, the reward, ``dones`` (1 at the last step) and the flat MuJoCo state
before the action (``states``, used to reset evaluation envs). An episode ends ``post_success_steps`` steps
after the task is first solved (robomimic's human demos also end right after success) or at ``max_steps``.
Failed episodes are dropped unless ``keep_failed``. The file is written atomically with ``train`` (90%) and
``valid`` (10%) masks and the exact ``env_args`` the env was built from.

With ``cameras`` (robomimic's image datasets: ``agentview``, ``robot0_eye_in_hand``) every step also records
``obs/<camera>_image`` (T, 84, 84, 3) uint8, upright, the frame rendered with the state before the action (MuJoCo
offscreen rendering; about 0.1 s per camera per step on a CPU). ``next_obs`` stays low-dim (the loaders read
``obs`` only; it halves the file).

    python -m envs.collect_robomimic --task lift --output data/lift/lift_expert.hdf5 --episodes 110 --seed 0
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

from pcm_policy.errors import PcmError
from pcm_policy.options import check_int

# recorded observation keys: the four low-dim policy inputs plus cheap robot proprioception
RECORD_OBS_KEYS = (
    "object",
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_gripper_qpos",
    "robot0_gripper_qvel",
    "robot0_joint_pos_cos",
    "robot0_joint_pos_sin",
    "robot0_joint_vel",
)


def split_train_valid(names: list[str], seed: int, valid_fraction: float = 0.1) -> dict[str, list[str]]:
    """Deterministic random split: ``valid`` gets round(10%) of the demos (at least 1 when there are >= 2)."""
    n = len(names)
    n_valid = int(round(n * valid_fraction))
    if n >= 2:
        n_valid = max(1, n_valid)
    if n_valid >= n:
        n_valid = n - 1 if n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    valid = set(order[:n_valid].tolist())
    return {
        "train": [names[i] for i in range(n) if i not in valid],
        "valid": [names[i] for i in range(n) if i in valid],
    }


def _record_episode(env, expert, seed: int, max_steps: int, post_success_steps: int, obs_keys) -> tuple[dict, bool]:
    env.reset(seed=seed)
    expert.reset(env)
    obs = {k: [] for k in obs_keys}
    next_obs = {k: [] for k in obs_keys}
    frames = {f"{c}_image": [] for c in env.cameras}
    actions, rewards, states = [], [], []
    cur = env.obs_dict(obs_keys)
    first_success = None
    for t in range(max_steps):
        states.append(env.get_state())
        for key, frame in env.camera_frames().items():
            frames[key].append(frame)
        action = np.clip(expert.act(env), -1.0, 1.0)
        _, reward, _, _, info = env.step(action)
        nxt = env.obs_dict(obs_keys)
        for k in obs_keys:
            obs[k].append(cur[k])
            next_obs[k].append(nxt[k])
        actions.append(action)
        rewards.append(reward)
        cur = nxt
        if info["is_success"] and first_success is None:
            first_success = t
        if first_success is not None and t >= first_success + post_success_steps:
            break
    T = len(actions)
    dones = np.zeros(T, dtype=np.int64)
    dones[-1] = 1
    demo = {
        "obs": {**{k: np.asarray(v, dtype=np.float64) for k, v in obs.items()},
                **{k: np.stack(v).astype(np.uint8) for k, v in frames.items()}},
        "next_obs": {k: np.asarray(v, dtype=np.float64) for k, v in next_obs.items()},
        "actions": np.asarray(actions, dtype=np.float64),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "dones": dones,
        "states": np.asarray(states, dtype=np.float64),
    }
    return demo, first_success is not None


def collect_robomimic(
    task: str,
    output_path: str | Path,
    episodes: int,
    seed: int = 0,
    keep_failed: bool = False,
    progress: bool = True,
    max_steps: int = 400,
    post_success_steps: int = 5,
    max_attempts: int | None = None,
    env_args: dict | None = None,
    obs_keys=RECORD_OBS_KEYS,
    overwrite: bool = False,
    cameras: tuple[str, ...] = (),
    camera_size: int = 84,
) -> dict:
    """Run the scripted expert until ``episodes`` demos are kept; write them to ``output_path``; return stats.

    Seeds ``seed, seed+1, ...`` are tried in order (at most ``max_attempts``, default ``3 * episodes + 10``).
    With ``keep_failed`` every episode is kept (so ``episodes`` is the number of attempts).
    Crash-safe and resumable like :func:`envs.collect_pusht.collect_pusht` (finished attempts are kept in
    ``<output>.partial/`` until the file is written); an existing complete output is left alone unless
    ``overwrite``. ``cameras`` (robosuite camera names) also records their ``camera_size`` square frames.

    Raises:
        PcmError: an option out of range; the expert kept too few demos; cameras without offscreen rendering.
    """
    from envs.collect_resume import EpisodeStore, check_existing_output
    from envs.robomimic_env import RobomimicLowDimEnv
    from envs.robomimic_expert import make_expert
    from pcm_policy.data.robomimic import write_robomimic_hdf5

    for key, value, low in (("episodes", episodes, 1), ("seed", seed, 0), ("max_steps", max_steps, 1)):
        check_int(key, value, low)
    max_attempts = max_attempts if max_attempts is not None else 3 * episodes + 10
    existing = check_existing_output(output_path, episodes, overwrite)
    if existing is not None:
        return {"task": task, **existing}
    env = RobomimicLowDimEnv(task, env_args=env_args, cameras=cameras, camera_size=camera_size)
    bar = None
    try:
        store = EpisodeStore(output_path, {"task": env.task, "seed": seed, "keep_failed": keep_failed,
                                           "max_steps": max_steps, "post_success_steps": post_success_steps,
                                           "obs_keys": list(obs_keys), "env_args": env.env_args, "format": 1,
                                           "cameras": list(cameras), "camera_size": camera_size})
        finished = store.open()
        resumed = store.kept(finished, episodes)
        expert = make_expert(env.task)
        demos, kept_seeds, failed_seeds = [], [], []
        n_steps, attempts = 0, 0
        t0 = time.perf_counter()
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=episodes, initial=resumed, desc=f"collect {env.task}", unit="demo")
            if finished:
                bar.write(f"resuming: {resumed} demos ({len(finished)} attempts) already recorded in {store.dir}")
        while len(demos) < episodes:
            if attempts >= max_attempts:
                raise PcmError(
                    f"{env.task} expert kept only {len(demos)} of {episodes} demos in {attempts} attempts "
                    f"(seeds {seed}..{seed + attempts - 1})"
                )
            s = seed + attempts
            attempts += 1
            if store.has(s):
                info, demo = store.load(s)
                ok, length, fresh = info["success"], info["length"], False
            else:
                demo, ok = _record_episode(env, expert, s, max_steps, post_success_steps, obs_keys)
                length, fresh = len(demo["actions"]), True
                store.save(s, {"success": bool(ok), "length": length, "kept": bool(ok or keep_failed)},
                           demo if ok or keep_failed else None)
            n_steps += length
            if not ok:
                failed_seeds.append(s)
            if ok or keep_failed:
                demos.append(demo)
                kept_seeds.append(s)
                if bar is not None and fresh:
                    bar.update(1)
            if bar is not None and fresh:
                bar.set_postfix(success=f"{attempts - len(failed_seeds)}/{attempts}", resumed=resumed)
        env_args_used = _recorded_env_args(env)
    finally:
        if bar is not None:
            bar.close()
        env.close()
    names = [f"demo_{i}" for i in range(len(demos))]
    masks = split_train_valid(names, seed)
    write_robomimic_hdf5(output_path, demos, env_args_used, masks=masks)
    store.finish()
    wall = time.perf_counter() - t0
    lengths = [len(d["actions"]) for d in demos]
    stats = {
        "task": env.task,
        "output_path": str(output_path),
        "demos": len(demos),
        "episodes": len(demos),
        "attempts": attempts,
        "successes": attempts - len(failed_seeds),
        "success_rate": (attempts - len(failed_seeds)) / attempts,
        "failed_seeds": failed_seeds,
        "seeds": [seed, seed + attempts - 1],
        "kept_seeds": kept_seeds,
        "train": len(masks["train"]),
        "valid": len(masks["valid"]),
        "total_steps": int(sum(lengths)),
        "mean_length": float(np.mean(lengths)),
        "env_steps": n_steps,
        "resumed_episodes": resumed,
        "wall_s": wall,
        "steps_per_s": n_steps / max(wall, 1e-9),
    }
    return stats


def _recorded_env_args(env) -> dict:
    """The env_args written to the file: those the env was built from, with the camera settings it recorded with
    (robomimic rebuilds an image env from them)."""
    env_args = copy.deepcopy(env.env_args)
    if env.cameras:
        env_args["env_kwargs"].update(has_offscreen_renderer=True, use_camera_obs=True, camera_names=list(env.cameras),
                                      camera_heights=env.camera_size, camera_widths=env.camera_size,
                                      camera_depths=False)
    return env_args


def collect_task(task, output_path, episodes: int, seed: int = 0, keep_failed: bool = False, max_steps: int = 400,
                 overwrite: bool = False, images: bool = False, progress: bool = True) -> dict:
    """The task registry's collector entry point for robomimic tasks (`collect_robomimic` on the task's robosuite
    env).

    Args:
        task: the registered `pcm_policy.tasks.Task` (a robomimic one).
        output_path, episodes, seed, keep_failed, max_steps, overwrite, progress: see `collect_robomimic`.
        images: also record robomimic's two cameras (`pcm collect` sets it for an image task such as `lift_image`).

    Raises:
        PcmError: see `collect_robomimic`.
    """
    from pcm_policy.tasks import ROBOMIMIC_CAMERAS

    cameras = ROBOMIMIC_CAMERAS if images else ()
    return collect_robomimic(task.robosuite_env, output_path, episodes, seed=seed, keep_failed=keep_failed,
                             progress=progress, max_steps=max_steps, overwrite=overwrite, cameras=cameras)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Collect scripted robomimic demos into a robomimic hdf5.")
    p.add_argument("--task", default="lift")
    p.add_argument("--output", required=True)
    p.add_argument("--episodes", type=int, default=110)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-failed", action="store_true")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cameras", nargs="*", default=[], help="also record these cameras (agentview robot0_eye_in_hand)")
    a = p.parse_args(argv)
    stats = collect_robomimic(a.task, a.output, a.episodes, seed=a.seed, keep_failed=a.keep_failed,
                              max_steps=a.max_steps, overwrite=a.overwrite, cameras=tuple(a.cameras))
    stats.pop("kept_seeds", None)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
