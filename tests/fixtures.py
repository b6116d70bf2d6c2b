"""Shared test helpers: writers for small datasets in the real on-disk layouts (for tests that need a file, or a
broken variant), tiny training runs, and the command-line runners and refusal checks.

The PushT writer uses zarr directly rather than ReplayBuffer.save, so reader tests do not only test the
library against itself; zarr is imported there only, so the GPU machine (no zarr) can use the hdf5 writers.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pcm_policy.commands import run_command
from pcm_policy.data.robomimic import write_robomimic_hdf5

PUSHT_EPISODE_LENGTHS = (12, 9, 15, 10)
ROBOMIMIC_DEMO_IDS = (0, 2, 10)  # not contiguous, and "demo_10" < "demo_2" as strings
ROBOMIMIC_LENGTHS = (8, 6, 11)
ROBOMIMIC_OBS_DIMS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2,
                      "robot0_joint_pos": 7}  # the last one is an extra key the loaders must ignore
ALL_CHUNKS = {"write_empty_chunks": True}  # as zarr 2 writes: all-zero chunks stored too (zarr 3 skips them)
LIFT_ENV_ARGS = {
    "env_name": "Lift", "type": 1,
    "env_kwargs": {"robots": ["Panda"], "control_freq": 20, "has_renderer": False,
                   "controller_configs": {"type": "OSC_POSE", "control_delta": True}},
}


def pusht_arrays(lengths=PUSHT_EPISODE_LENGTHS, seed: int = 0) -> dict[str, np.ndarray]:
    """Concatenated PushT-like arrays plus `episode_ends`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    return {
        "state": np.concatenate([rng.uniform(0, 512, (n, 4)), rng.uniform(-np.pi, np.pi, (n, 1))],
                                axis=1).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "n_contacts": rng.integers(0, 3, (n, 1)).astype(np.float32),
        "episode_ends": np.cumsum(lengths).astype(np.int64),
    }


def write_pusht_zarr(path, lengths=PUSHT_EPISODE_LENGTHS, seed: int = 0, chunk_length: int = 7,
                     arrays: dict | None = None) -> Path:
    """Write a zarr v2 replay buffer (a zip when `path` ends with .zip); Blosc data, uncompressed ends.

    `arrays` (as returned by pusht_arrays, possibly edited) overrides the generated data.
    """
    import numcodecs
    import zarr

    path = Path(path)
    arrays = arrays if arrays is not None else pusht_arrays(lengths, seed)
    store = zarr.storage.ZipStore(path, mode="w") if path.suffix == ".zip" else zarr.storage.LocalStore(path)
    try:
        root = zarr.open_group(store, mode="w", zarr_format=2)
        blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
        for key, arr in arrays.items():
            if key == "episode_ends":
                root.create_array("meta/episode_ends", data=arr, chunks=arr.shape, compressors=None, config=ALL_CHUNKS)
            else:
                chunks = (min(chunk_length, len(arr)), *arr.shape[1:])
                root.create_array(f"data/{key}", data=arr, chunks=chunks, compressors=blosc, config=ALL_CHUNKS)
    finally:
        store.close()
    return path


def robomimic_demos(lengths=ROBOMIMIC_LENGTHS, seed: int = 0, abs_action: bool = False,
                    state_dim: int = 32) -> list[dict]:
    """Demos in the shape write_robomimic_hdf5 takes; abs actions are [pos3, axisangle3, gripper]."""
    rng = np.random.default_rng(seed)
    demos = []
    for T in lengths:
        obs = {k: rng.normal(size=(T, d)) for k, d in ROBOMIMIC_OBS_DIMS.items()}
        obs["robot0_eef_quat"] /= np.linalg.norm(obs["robot0_eef_quat"], axis=1, keepdims=True)
        if abs_action:
            aa = rng.normal(size=(T, 3))
            aa *= rng.uniform(0.1, 3.0, (T, 1)) / np.linalg.norm(aa, axis=1, keepdims=True)
            actions = np.concatenate([rng.normal(size=(T, 3)), aa, rng.choice([-1.0, 1.0], (T, 1))], 1)
        else:
            actions = rng.uniform(-1, 1, (T, 7))
        demos.append({
            "obs": obs, "next_obs": {k: np.roll(v, -1, axis=0) for k, v in obs.items()},
            "actions": actions, "rewards": np.zeros(T), "dones": np.eye(T)[-1],
            "states": rng.normal(size=(T, state_dim)),
        })
    return demos


def write_robomimic_fixture(path, demo_ids=ROBOMIMIC_DEMO_IDS, lengths=ROBOMIMIC_LENGTHS, seed: int = 0,
                            abs_action: bool = False, masks: dict | None = None) -> Path:
    """robomimic low-dim hdf5 with demos demo_<id>; default masks: valid = the second demo, train = the rest."""
    names = [f"demo_{i}" for i in demo_ids]
    if masks is None:
        masks = {"train": [n for j, n in enumerate(names) if j != 1], "valid": names[1:2]}
    env_args = {**LIFT_ENV_ARGS, "env_kwargs": {**LIFT_ENV_ARGS["env_kwargs"], "controller_configs": {
        "type": "OSC_POSE", "control_delta": not abs_action}}}
    write_robomimic_hdf5(path, robomimic_demos(lengths, seed, abs_action), env_args, masks=masks, demo_names=names)
    return Path(path)


TINY_POLICY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]


def train_tiny_base(root: Path, steps: int = 10) -> Path:
    """A tiny PushT policy trained for `steps` steps on a fixture replay buffer written under `root`; returns
    its run directory `root/base` (seconds on a CPU; its actions mean nothing)."""
    data = write_pusht_zarr(Path(root) / "d.zarr", lengths=[30, 40, 25, 35, 28])
    run_command("train", [f"dataset.path={data}", f"output_dir={Path(root) / 'base'}", "device=cpu",
                          f"train.steps={steps}", "train.batch_size=16", f"train.checkpoint_every={steps}",
                          *TINY_POLICY])
    return Path(root) / "base"


def train_tiny_pcm(base: Path, out: Path, scheduler: str, steps: int) -> Path:
    """A tiny LoRA PCM for `base` and the `scheduler` (ddpm | ddim) with `steps` sampling steps (one epoch)."""
    run_command("train-pcm", [f"base={base}", f"output_dir={out}", "device=cpu", f"scheduler={scheduler}",
                              f"steps={steps}", "trajectories=4", "collect_batch=4", "epochs=1", "batch_size=4",
                              "eval_observations=1", "lora_rank=2"])
    return Path(out)


ROBOMIMIC_CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")


def pusht_image_arrays(lengths=PUSHT_EPISODE_LENGTHS, seed: int = 0, dtype=np.uint8, size: int = 96) -> dict:
    """pusht_arrays plus `img` (N, size, size, 3) in 0..255 (`dtype` uint8, or float32 as in DP's file): red = the
    buffer row, green = the episode, blue = seeded noise, so a test can tell which frame a window holds."""
    arrays = pusht_arrays(lengths, seed)
    n = int(sum(lengths))
    img = np.random.default_rng(seed + 1).integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    img[..., 0] = (np.arange(n) % 256)[:, None, None]
    img[..., 1] = np.repeat(np.arange(len(lengths)), lengths)[:, None, None]
    arrays["img"] = img.astype(dtype)
    return arrays


def write_robomimic_image_fixture(path, demo_ids=ROBOMIMIC_DEMO_IDS, lengths=ROBOMIMIC_LENGTHS, seed: int = 0,
                                  cameras=ROBOMIMIC_CAMERAS, size: int = 84) -> Path:
    """robomimic image hdf5 (masks as write_robomimic_fixture): the low-dim obs plus (T, size, size, 3) uint8 per
    camera, red = the global step row, green = the camera index, blue = seeded noise."""
    names = [f"demo_{i}" for i in demo_ids]
    demos = robomimic_demos(lengths, seed)
    rng, row = np.random.default_rng(seed + 1), 0
    for demo, T in zip(demos, lengths):
        for c, cam in enumerate(cameras):
            img = rng.integers(0, 256, (T, size, size, 3)).astype(np.uint8)
            img[..., 0] = (row + np.arange(T))[:, None, None] % 256
            img[..., 1] = c
            demo["obs"][cam] = img
        row += T
    masks = {"train": [n for j, n in enumerate(names) if j != 1], "valid": names[1:2]}
    write_robomimic_hdf5(path, demos, LIFT_ENV_ARGS, masks=masks, demo_names=names)
    return Path(path)


# ---- the command line --------------------------------------------------------------------------------------
def pcm(*args, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `pcm ARGS` in a fresh process, as a user would (captured output)."""
    return subprocess.run([sys.executable, "-m", "pcm_policy.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *needles) -> str:
    """Exit status 2 (a PcmError), exactly one non-empty stderr line starting `pcm: error:` and containing every
    needle, no traceback; returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("pcm: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def tree(root) -> set[str]:
    """Every file and folder under `root`, relative: compared before and after a refused command."""
    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    """Run `pcm ARGS` in this process; (exit status, non-empty stderr lines)."""
    from pcm_policy.cli import main

    code = main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_refused(capsys, root, *args, needles=()) -> str:
    """`pcm ARGS` in this process: exit 2, one `pcm: error:` line holding every needle, and no file or folder
    added or removed under `root`; returns the line."""
    before = tree(root)
    code, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("pcm: error: "), (code, err)
    for needle in needles:
        assert str(needle) in err[0], err[0]
    assert tree(root) == before, sorted(tree(root) ^ before)
    return err[0]

