"""The one registry of tasks: every per-task fact in one place, read by the envs, the commands and the configs.

A task ties together the env (gymnasium id, simulator, robosuite env name, control rate, time limit), the
observation it gives (named parts of the flat low-dim vector), its scripted expert and collector (entry points,
resolved lazily so nothing here imports a simulator), how an episode is scored, and what ships in `data/` (the
dataset file, how many episodes it holds and the command that regenerates it, the base policy). The Hydra task
configs (`configs/task/*.yaml`) read their defaults from here through the `${registry:<name>,<field>}` resolver that
`pcm_policy.config.compose` registers. Nothing here knows of diffusion, and it imports nothing of the package
but its errors and option checks.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pcm_policy.errors import ConfigError, DatasetError
from pcm_policy.options import check_int, check_number, check_text

SCORES = ("coverage", "success")
PUSHT_SUCCESS_COVERAGE = 0.95  # Diffusion Policy's PushT success threshold on the block/goal coverage


@dataclass(frozen=True)
class ObservationLayout:
    """One flat low-dim observation a task's envs can give, and the env that gives it.

    Attributes:
        kind: its name, written in checkpoint cards (`observation.kind`).
        parts: (part name, size) in order: the flat per-step vector is their concatenation.
        env_id: the gymnasium id of the env that returns it.
        env_kwargs: keyword arguments of the task's env class for it.
        cameras: the camera images the env gives besides the flat vector (its observation is then a dict of `obs`,
            the vector, and `image`, (cameras, 3, H, W) uint8), in order; empty for a low-dim env.
    """

    kind: str
    parts: tuple[tuple[str, int], ...]
    env_id: str
    env_kwargs: tuple[tuple[str, Any], ...] = ()
    cameras: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Do, the size of the flat vector."""
        return sum(size for _, size in self.parts)


@dataclass(frozen=True)
class Task:
    """One task's facts.

    Attributes:
        name: the config name (`task=<name>`).
        entry_point: the env class, `module:Class` (gymnasium's convention).
        robosuite_env: robosuite's env name (robomimic tasks), else None.
        control_hz: control frequency (Hz).
        max_steps: evaluation time limit in control steps (Diffusion Policy's convention).
        observations: the observation layouts its envs give, the task's own (its datasets', its policies') first;
            e.g. PushT's 9 keypoints x 2 + agent position 2 = 20, and lerobot's agent position + 8 block corners.
        action_dim: Da of the env's action (robomimic: 7 delta actions).
        score: `coverage` (PushT: clip(max coverage / 0.95, 0, 1)) or `success` (the success rate).
        expert: the scripted demonstrator, `module:factory` taking (task, env) after `env.reset`.
        collector: the dataset writer, `module:function` taking (task, path, episodes, seed, keep_failed,
            max_steps, overwrite, images) (`envs.collect_pusht.collect_task`, `envs.collect_robomimic.collect_task`);
            every collector can also record camera images (`pcm collect images=true`).
        dataset_kind: the dataset format its collector writes and the loaders read.
        dataset_path: the shipped (or regenerable) scripted-expert dataset, relative to the repository root.
        dataset_episodes: episodes in that dataset (seed 0).
        dataset_shipped: whether the dataset is in the repository (else only its command ships).
        base: the shipped base policy checkpoint, relative to the repository root.
        policy: the `policy=` config its policies train with by default here (an image one for a camera task).
        shipped_pcms: the schedules (`ddpm100`, `ddim10`) whose LoRA PCM of `base` ships beside it, as
            `<data_dir>/pcm_lora_<schedule>` (`pcm demo`'s defaults).
    """

    name: str
    entry_point: str
    robosuite_env: str | None
    control_hz: float
    max_steps: int
    observations: tuple[ObservationLayout, ...]
    action_dim: int
    score: str
    expert: str
    collector: str
    dataset_kind: str
    dataset_path: str
    dataset_episodes: int
    dataset_shipped: bool
    base: str
    policy: str = "unet_small"
    shipped_pcms: tuple[str, ...] = ()

    @property
    def env_id(self) -> str:
        """The gymnasium id of the task's own observation layout."""
        return self.observations[0].env_id

    @property
    def obs_layout(self) -> tuple[tuple[str, int], ...]:
        """The task's own observation layout, (part name, size) in order."""
        return self.observations[0].parts

    @property
    def obs_dim(self) -> int:
        """Do, the size of the task's own flat low-dim observation."""
        return self.observations[0].size

    def layout(self, kind: str | None, key: str = "checkpoint") -> ObservationLayout:
        """The observation layout `kind` (None: the task's own).

        Raises:
            ConfigError: no env of this task gives that observation (the message names `key`).
        """
        if kind is None:
            return self.observations[0]
        for layout in self.observations:
            if layout.kind == kind:
                return layout
        raise ConfigError(f"{key}: the policy expects observation {kind!r}, which no env of task {self.name} gives "
                          f"(it gives {', '.join(o.kind for o in self.observations)})")

    @property
    def data_dir(self) -> str:
        """The folder of the task's shipped data, e.g. `data/pusht`."""
        return self.dataset_path.rsplit("/", 1)[0]

    @property
    def cameras(self) -> tuple[str, ...]:
        """The camera images of the task's own observation (empty for a low-dim task)."""
        return self.observations[0].cameras

    def shipped_pcm_lora(self, schedule: str) -> str | None:
        """The shipped LoRA PCM of `base` for `schedule` (e.g. `ddim10`), or None."""
        return f"{self.data_dir}/pcm_lora_{schedule}" if schedule in self.shipped_pcms else None

    @property
    def demo_schedules(self) -> list[str]:
        """`pcm demo`'s latency comparison: the schedules with a shipped PCM (DDIM-10 for a task without)."""
        return list(self.shipped_pcms) or ["ddim10"]

    @property
    def collect_command(self) -> str:
        """The command that regenerates the scripted-expert dataset."""
        return f"pcm collect task={self.name} episodes={self.dataset_episodes} seed=0 output_dir={self.data_dir}"

    def episode_score(self, success: bool, max_coverage: float | None) -> float:
        """An episode's score in [0, 1]: clip(max coverage / 0.95, 0, 1) for `coverage` tasks with a coverage,
        else 1.0 on success and 0.0 otherwise."""
        if self.score == "coverage" and max_coverage is not None:
            return float(min(max(max_coverage / PUSHT_SUCCESS_COVERAGE, 0.0), 1.0))
        return float(success)


_ROBOMIMIC_OBS = (("object", 0), ("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))


def _robomimic(name: str, robosuite_env: str, object_dim: int, episodes: int, shipped: bool) -> Task:
    parts = tuple((k, object_dim if k == "object" else d) for k, d in _ROBOMIMIC_OBS)
    layout = ObservationLayout("robomimic_lowdim", parts, f"pcm/{robosuite_env}-v0", (("task", robosuite_env),))
    return Task(name=name, entry_point="envs.robomimic_env:RobomimicLowDimEnv", robosuite_env=robosuite_env,
                control_hz=20, max_steps=400, observations=(layout,), action_dim=7, score="success",
                expert="envs.experts:make_expert",
                collector="envs.collect_robomimic:collect_task", dataset_kind="robomimic_hdf5",
                dataset_path=f"data/{name}/{name}_expert.hdf5", dataset_episodes=episodes, dataset_shipped=shipped,
                base=f"data/{name}/base", shipped_pcms=("ddim10",))


# robomimic's image tasks (Diffusion Policy's `*_image` configs): the robot's own state and two 84x84 cameras
ROBOMIMIC_CAMERAS = ("agentview", "robot0_eye_in_hand")  # robosuite's camera names
ROBOMIMIC_CAMERA_KEYS = tuple(f"{c}_image" for c in ROBOMIMIC_CAMERAS)  # their dataset / observation keys
_ROBOMIMIC_ROBOT_OBS = (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))
ROBOMIMIC_ROBOT_KEYS = tuple(k for k, _ in _ROBOMIMIC_ROBOT_OBS)  # the low-dim part: no `object` key


def _robomimic_image(name: str, robosuite_env: str, episodes: int) -> Task:
    layout = ObservationLayout("robomimic_image", _ROBOMIMIC_ROBOT_OBS, f"pcm/{robosuite_env}-image-v0",
                               (("task", robosuite_env), ("obs_keys", ROBOMIMIC_ROBOT_KEYS),
                                ("cameras", ROBOMIMIC_CAMERAS)),
                               cameras=ROBOMIMIC_CAMERA_KEYS)
    return Task(name=name, entry_point="envs.robomimic_env:RobomimicLowDimEnv", robosuite_env=robosuite_env,
                control_hz=20, max_steps=400, observations=(layout,), action_dim=7, score="success",
                expert="envs.experts:make_expert", collector="envs.collect_robomimic:collect_task",
                dataset_kind="robomimic_hdf5",
                dataset_path=f"data/{name}/{name}_expert.hdf5", dataset_episodes=episodes, dataset_shipped=False,
                base=f"data/{name}/base", policy="unet_small_image_robomimic")


TASKS: dict[str, Task] = {t.name: t for t in (
    Task(name="pusht", entry_point="envs.pusht:PushTLowDimEnv", robosuite_env=None, control_hz=10, max_steps=300,
         observations=(
             # Diffusion Policy's low-dim PushT: its 9 block keypoints, then the agent position
             ObservationLayout("dp_pusht_lowdim", (("keypoints", 18), ("agent_pos", 2)), "pcm/PushT-v0"),
             # lerobot's state-based PushT (gym-pusht `environment_state_agent_pos`), in lerobot's conditioning
             # order: the agent position (`observation.state`), then the T's 8 corners (`observation.environment_state`)
             ObservationLayout("lerobot_pusht_keypoints", (("observation.state", 2),
                                                           ("observation.environment_state", 16)),
                               "pcm/PushT-envstate-v0", (("observation", "agent_pos+environment_state"),))),
         action_dim=2, score="coverage",
         expert="envs.experts:make_expert", collector="envs.collect_pusht:collect_task",
         dataset_kind="pusht_zarr",
         dataset_path="data/pusht/pusht_expert.zarr", dataset_episodes=500, dataset_shipped=True,
         base="data/pusht/base", shipped_pcms=("ddpm100", "ddim10")),
    # Diffusion Policy's image PushT (gym-pusht `pixels_agent_pos`): the agent position and one 96x96 RGB camera,
    # in DP's zarr layout with `data/img`; the collector records the frames with the same scripted expert.
    Task(name="pusht_image", entry_point="envs.pusht:PushTLowDimEnv", robosuite_env=None, control_hz=10,
         max_steps=300,
         observations=(ObservationLayout("dp_pusht_image", (("agent_pos", 2),), "pcm/PushT-image-v0",
                                         (("observation", "agent_pos+image"),), cameras=("img",)),
                       # lerobot's `diffusion_pusht`: the same env, its feature names
                       ObservationLayout("lerobot_pusht_image", (("observation.state", 2),), "pcm/PushT-image-v0",
                                         (("observation", "agent_pos+image"),), cameras=("observation.image",))),
         action_dim=2, score="coverage", expert="envs.experts:make_expert",
         collector="envs.collect_pusht:collect_task", dataset_kind="pusht_zarr",
         dataset_path="data/pusht_image/pusht_image_expert.zarr", dataset_episodes=200, dataset_shipped=False,
         base="data/pusht_image/base", policy="unet_small_image", shipped_pcms=("ddim10",)),
    _robomimic("lift", "Lift", 10, 120, shipped=False),
    _robomimic("can", "PickPlaceCan", 14, 200, shipped=False),
    _robomimic_image("lift_image", "Lift", 100),
    _robomimic_image("can_image", "PickPlaceCan", 200),
)}


@dataclass(frozen=True)
class TaskOptions:
    """The `task` group of a run config: a registered task and the facts a run may override.

    Attributes:
        name: the registered task.
        env_id: the gymnasium id episodes run in (default: the task's).
        control_hz: the control frequency (Hz).
        max_steps: the time limit in control steps.

    Raises:
        ConfigError: an unknown task, or a value of the wrong type or range, naming `task.<key>`.
    """

    name: str
    env_id: str
    control_hz: float
    max_steps: int

    def __post_init__(self):
        check_text("task.name", self.name)
        get_task(self.name)
        check_text("task.env_id", self.env_id)
        check_number("task.control_hz", self.control_hz, 0, low_open=True)
        check_int("task.max_steps", self.max_steps, 1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "TaskOptions":
        """Read the `task` group (absent keys take the registered task's values).

        Raises:
            ConfigError: see the class.
        """
        task = get_task(check_text("task.name", cfg.get("name")))
        return cls(name=task.name, env_id=cfg.get("env_id", task.env_id),
                   control_hz=cfg.get("control_hz", task.control_hz), max_steps=cfg.get("max_steps", task.max_steps))

    @property
    def spec(self) -> Task:
        """The registered task."""
        return TASKS[self.name]

    def env_for(self, observation_kind: str | None, parts: Sequence[tuple[str, int]] | None = None,
                key: str = "checkpoint") -> str:
        """The env id an episode of a policy with observation `observation_kind` runs in: the env of that layout
        (None: the task's own), unless the run overrides `task.env_id`.

        Args:
            observation_kind: the layout the policy expects (None: the task's own).
            parts: the policy's (name, size) parts, when its card lists them: they must be the env's.
            key: the option naming the policy, for messages.

        Raises:
            ConfigError: no env of the task gives that observation, or gives its parts in another order or size.
        """
        layout = self.spec.layout(observation_kind, key)
        if parts is not None and tuple(map(tuple, parts)) != layout.parts:
            raise ConfigError(f"{key}: the policy's observation parts {list(map(tuple, parts))} are not the "
                              f"{layout.kind} env's {list(layout.parts)} (another order or size)")
        return layout.env_id if self.env_id == self.spec.env_id else self.env_id


def cameras_of_env(env_id: str) -> list[tuple[str, ...]] | None:
    """The camera layouts the registered env `env_id` gives, one per observation layout it serves (the same frames
    under each layout's names; `()` for a low-dim env); None for an env of no task here."""
    found = [layout.cameras for task in TASKS.values() for layout in task.observations if layout.env_id == env_id]
    return found or None


def get_task(name: str, key: str = "task.name") -> Task:
    """The registered task `name`.

    Raises:
        ConfigError: no such task (the message names `key` and lists the tasks).
    """
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise ConfigError(f"{key}={name!r}: expected one of {', '.join(TASKS)}")
    return task


def task_of_robosuite_env(env_name: str) -> Task:
    """The task whose robosuite env is `env_name` (any case; `lift`/`can` task names accepted too).

    Raises:
        ConfigError: no registered task runs that robosuite env.
    """
    wanted = str(env_name).lower().replace("-", "_").replace("_", "")
    for task in TASKS.values():
        if task.robosuite_env and wanted in (task.name, task.robosuite_env.lower()):
            return task
    names = ", ".join(dict.fromkeys(t.robosuite_env for t in TASKS.values() if t.robosuite_env))
    raise ConfigError(f"unknown robomimic task {env_name!r}: expected one of {names} (or "
                      f"{', '.join(t.name for t in TASKS.values() if t.robosuite_env)})")


def resolve_entry_point(spec: str):
    """The object a `module:attribute` entry point names (imported now, e.g. a simulator's module)."""
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(module), attribute)


def task_field(name: str, field: str, *args: Any) -> Any:
    """`getattr(get_task(name), field)`, for the configs' `${registry:<name>,<field>}` resolver; with more
    arguments (`${registry:<name>,<method>,<arg>}`) the method's value for them."""
    value = getattr(get_task(name), field)
    return value(*args) if args else value


def missing_dataset(path) -> DatasetError:
    """The error for a dataset path that does not exist; for a task's scripted-expert dataset
    (`<task>_expert.zarr` or `.hdf5`, e.g. PickPlaceCan's, which ships as its command only) it says how to
    regenerate it.

    Args:
        path: the missing file or directory.

    Returns:
        A DatasetError to raise.
    """
    p = Path(path)
    msg = f"{path}: no such file or directory"
    for task in TASKS.values():
        if p.name == Path(task.dataset_path).name:
            command = task.collect_command.rsplit("output_dir=", 1)[0] + f"output_dir={p.parent}"
            msg += f" (regenerate it with the scripted expert: {command}; see {task.data_dir}/README.md)"
    return DatasetError(msg)
