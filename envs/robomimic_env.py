"""Low-dimensional robomimic tasks (Lift, PickPlaceCan) as gymnasium envs, built directly on robosuite 1.4.1.

The env is created from robomimic-style ``env_args`` (the JSON stored in ``data.attrs["env_args"]`` of a
robomimic hdf5 file), so the same code evaluates policies trained on real robomimic files and on the files
written by :mod:`envs.collect_robomimic`:

    {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"], "control_freq": 20,
     "controller_configs": {"type": "OSC_POSE", ...}, "reward_shaping": false, ...}}

robomimic writes the env type under ``"type"`` (1 = robosuite); ``"env_type"`` is accepted as an alias.

Conventions (documented choices):

* Observation: ``concat(obs_keys)`` as float32; default keys ``object, robot0_eef_pos, robot0_eef_quat,
  robot0_gripper_qpos`` (19-d Lift, 23-d PickPlaceCan). robosuite calls the object vector ``object-state``;
  it is exposed as ``object`` like in robomimic files. ``robot0_eef_quat`` is xyzw.
* Action: 7-d ``[dpos3, daxisangle3, gripper]`` in [-1, 1] for the delta OSC_POSE controller (robomimic
  default). ``abs_action=True`` switches the controller to absolute targets (``control_delta=False``; action
  ``[pos3 (world frame), axisangle3, gripper]``), as Diffusion Policy's ``*_abs`` datasets use. The absolute
  axis-angle is the orientation of the controller's grip site, which is the ``robot0_eef_quat`` body frame
  turned 90 degrees about z: take targets from the controller (``robots[0].controller.goal_ori``), not from
  the observed quaternion.
* env_kwargs that robosuite 1.4.1 does not accept (e.g. robosuite 1.5's ``lite_physics``) are dropped with
  a warning; robomimic's older controller keys (``damping``, ``damping_limits``) are ignored by robosuite.
* Episodes never terminate on their own (``terminated`` is always False unless ``terminate_on_success=True``):
  like robomimic / Diffusion Policy evaluation, the rollout runs until the TimeLimit (400 steps for the
  registered ids) and success is ``info["is_success"]`` (robosuite ``_check_success()``) at any step.
  Reward is robosuite's (sparse 1.0 while the task is solved, unless ``reward_shaping`` is set).
* ``reset(seed=s)`` seeds numpy's *global* RNG with ``s`` right before the robosuite reset (robosuite samples
  object placement and robot initialisation noise from it, as Diffusion Policy's robomimic runner does), then
  restores the caller's global RNG state. Without a seed, the placement seed is drawn from ``self.np_random``.
* ``reset(options={"initial_state": flat_state})`` resets and then loads a flat MuJoCo state
  ``[time, qpos, qvel]`` (a dataset's ``states[0]``), like robomimic's ``reset_to``; the arm controllers'
  goals are re-anchored at the loaded pose so that replay is deterministic.
* Camera observations: with ``cameras`` (robosuite camera names, e.g. ``("agentview", "robot0_eye_in_hand")``)
  the observation is a dict of ``obs``, the flat low-dim vector above, and ``image``, (cameras, 3, H, W) uint8
  channel-first RGB, upright (robosuite renders bottom-up; robomimic's image datasets store the frames flipped,
  as here). Each frame is an MuJoCo offscreen render (EGL, or ``MUJOCO_GL=osmesa``); on a CPU (Mesa's llvmpipe)
  one 84x84 camera costs about 0.1 s per step. :meth:`camera_frames` gives the frames as the collector stores
  them: ``<camera>_image`` (H, W, 3) uint8, robomimic's dataset keys.
* Rendering: ``render_mode="rgb_array"`` turns on robosuite's offscreen renderer (EGL by default, or
  ``MUJOCO_GL=osmesa``) and ``render()`` returns the ``agentview`` camera as HxWx3 uint8. Without it (the
  default, as offscreen contexts cost time at every hard reset) ``render()`` returns None.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import warnings
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from pcm_policy.errors import DatasetError, PcmError
from pcm_policy.tasks import task_of_robosuite_env

LOW_DIM_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ROBOSUITE_ENV_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE

# robosuite observation names that differ from the robomimic dataset keys
_KEY_TO_ROBOSUITE = {"object": "object-state"}


def canonical_task(task: str) -> str:
    """Map 'lift' / 'Lift' / 'can' / 'PickPlaceCan' to robosuite's env name ('Lift', 'PickPlaceCan'), by the task
    registry (`pcm_policy.tasks`).

    Raises:
        ConfigError: no registered task runs that robosuite env.
    """
    return task_of_robosuite_env(task).robosuite_env


def default_controller_config() -> dict:
    """The OSC_POSE delta controller config carried by robomimic's datasets (robosuite 1.4 key names)."""
    return {
        "type": "OSC_POSE",
        "input_max": 1,
        "input_min": -1,
        "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
        "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
        "kp": 150,
        "damping_ratio": 1,
        "impedance_mode": "fixed",
        "kp_limits": [0, 300],
        "damping_ratio_limits": [0, 10],
        "position_limits": None,
        "orientation_limits": None,
        "uncouple_pos_ori": True,
        "control_delta": True,
        "interpolation": None,
        "ramp_ratio": 0.2,
    }


def default_env_args(task: str) -> dict:
    """robomimic-standard env_args for Lift / PickPlaceCan: Panda, OSC_POSE delta, 20 Hz, sparse reward."""
    name = canonical_task(task)
    return {
        "env_name": name,
        "type": ROBOSUITE_ENV_TYPE,
        "env_version": "1.4.1",
        "env_kwargs": {
            "has_renderer": False,
            "has_offscreen_renderer": False,
            "ignore_done": True,
            "use_object_obs": True,
            "use_camera_obs": False,
            "control_freq": 20,
            "controller_configs": default_controller_config(),
            "robots": ["Panda"],
            "camera_depths": False,
            "camera_heights": 84,
            "camera_widths": 84,
            "reward_shaping": False,
        },
    }


def parse_env_args(env_args: dict | str) -> dict:
    """Validate env_args (a dict or its JSON string) and return a deep copy."""
    if isinstance(env_args, (str, bytes)):
        try:
            env_args = json.loads(env_args)
        except json.JSONDecodeError as e:
            raise DatasetError(f"env_args is not valid JSON: {e}") from None
    if not isinstance(env_args, dict) or "env_name" not in env_args:
        raise DatasetError("env_args must be a dict with 'env_name' and 'env_kwargs'")
    env_args = copy.deepcopy(env_args)
    env_type = env_args.get("type", env_args.get("env_type", ROBOSUITE_ENV_TYPE))
    if int(env_type) != ROBOSUITE_ENV_TYPE:
        raise DatasetError(f"env_args type {env_type} is not a robosuite env (expected {ROBOSUITE_ENV_TYPE})")
    env_args.setdefault("env_kwargs", {})
    return env_args


def _accepted_kwargs(env_cls) -> set[str] | None:
    """Keyword names accepted by a robosuite env class (walking **kwargs-forwarding subclasses)."""
    names: set[str] = set()
    for cls in env_cls.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        params = inspect.signature(cls.__dict__["__init__"]).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None  # accepts anything


def _import_robosuite():
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    try:
        import robosuite  # noqa: F401
        from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER

        ROBOSUITE_DEFAULT_LOGGER.setLevel(logging.ERROR)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PcmError(
            f"robosuite is not importable ({e}); install the robomimic extra: pip install -e '.[robomimic]'"
        ) from None
    return robosuite


@functools.lru_cache(maxsize=None)
def offscreen_gl_error() -> str | None:
    """Why no offscreen OpenGL context can be made here, or None if one can.

    Checks GL itself, the way robosuite renders: its `GLContext` for the `MUJOCO_GL` backend (EGL, OSMesa or
    GLFW) is created and made current, and MuJoCo's renderer loads its GL functions in it (an empty model's
    `MjrContext`). A rendering env's other failures are then not mistaken for "this machine cannot render" (nor
    turned into test skips).
    """
    try:
        _import_robosuite()
        import mujoco
        from robosuite.utils import binding_utils

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # GLFW reports a missing display as a warning
            context = binding_utils.GLContext(max_width=8, max_height=8)
            try:
                context.make_current()
                mujoco.MjrContext(mujoco.MjModel.from_xml_string("<mujoco/>"),
                                  mujoco.mjtFontScale.mjFONTSCALE_100).free()
            finally:
                context.free()
    except Exception as e:  # the backends fail with ImportError, RuntimeError, AttributeError, GL errors
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no context'}"
    return None


class RobomimicLowDimEnv(gym.Env):
    """robosuite Lift / PickPlaceCan with robomimic low-dim observations; see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "Lift",
        env_args: dict | str | None = None,
        obs_keys: Sequence[str] | None = None,
        render_size: tuple[int, int] = (256, 256),
        abs_action: bool = False,
        render_mode: str | None = None,
        render_camera: str = "agentview",
        terminate_on_success: bool = False,
        cameras: Sequence[str] = (),
        camera_size: int = 84,
    ):
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise PcmError(f"render_mode {render_mode!r} is not supported (use 'rgb_array' or None)")
        self.env_args = parse_env_args(env_args) if env_args is not None else default_env_args(task)
        self.task = canonical_task(self.env_args["env_name"])
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else LOW_DIM_KEYS
        self.render_size = (int(render_size[0]), int(render_size[1]))  # (height, width)
        self.render_camera = render_camera
        self.render_mode = render_mode
        self.abs_action = bool(abs_action)
        self.terminate_on_success = bool(terminate_on_success)
        self.cameras = tuple(cameras)
        self.camera_size = int(camera_size)

        robosuite = _import_robosuite()
        kwargs = copy.deepcopy(self.env_args["env_kwargs"])
        ctrl = kwargs.setdefault("controller_configs", default_controller_config())
        ctrl["control_delta"] = not self.abs_action
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array" or bool(self.cameras),
            use_camera_obs=bool(self.cameras),
            ignore_done=True,
            use_object_obs=True,
        )
        if self.cameras:
            kwargs.update(camera_names=list(self.cameras), camera_heights=self.camera_size,
                          camera_widths=self.camera_size, camera_depths=False)
        env_cls = robosuite.environments.base.REGISTERED_ENVS.get(self.task)
        accepted = _accepted_kwargs(env_cls) if env_cls is not None else None
        if accepted is not None:
            dropped = sorted(k for k in kwargs if k not in accepted)
            if dropped:
                warnings.warn(f"robosuite {self.task} ignores env_kwargs {dropped} (not robosuite 1.4.1 args)")
                for k in dropped:
                    kwargs.pop(k)
        try:
            self._env = robosuite.make(self.task, **kwargs)
        except Exception:
            no_gl = offscreen_gl_error() if kwargs["has_offscreen_renderer"] else None
            if no_gl is None:  # not a rendering problem (or GL works): a real failure, reported as it is
                raise
            if self.cameras:
                raise PcmError(f"robosuite {self.task}: camera observations {list(self.cameras)} need MuJoCo offscreen "
                               f"rendering, and no offscreen OpenGL context can be made here ({no_gl}); try "
                               "MUJOCO_GL=egl or MUJOCO_GL=osmesa") from None
            warnings.warn(f"no offscreen OpenGL context ({no_gl}); render() returns None")
            kwargs["has_offscreen_renderer"] = False
            self._env = robosuite.make(self.task, **kwargs)
        self.make_kwargs = kwargs  # exactly what robosuite.make received
        self.can_render = bool(kwargs["has_offscreen_renderer"])

        spec = self._env.observation_spec()
        missing = [k for k in self.obs_keys if _KEY_TO_ROBOSUITE.get(k, k) not in spec]
        if missing:
            raise PcmError(f"obs keys {missing} are not robosuite {self.task} observations ({sorted(spec)})")
        self.obs_dims = {k: int(np.asarray(spec[_KEY_TO_ROBOSUITE.get(k, k)]).size) for k in self.obs_keys}
        dim = sum(self.obs_dims.values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        if self.cameras:
            missing = [c for c in self.cameras if f"{c}_image" not in spec]
            if missing:
                raise PcmError(f"cameras {missing} are not robosuite {self.task} cameras")
            size = self.camera_size
            self.observation_space = gym.spaces.Dict({
                "obs": self.observation_space,
                "image": gym.spaces.Box(0, 255, shape=(len(self.cameras), 3, size, size), dtype=np.uint8)})
        if self.abs_action:
            low = np.array([-np.pi] * 6 + [-1.0], dtype=np.float32)
            self.action_space = gym.spaces.Box(low, -low, dtype=np.float32)
        else:
            self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)
        self.raw_obs: dict[str, np.ndarray] = {}
        self.state_dim = int(self._env.sim.get_state().flatten().size)

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def robosuite_env(self):
        """The underlying robosuite env (sim, robots, object ids) for scripted experts."""
        return self._env

    def _set_raw(self, raw: dict) -> None:
        self.raw_obs = {k: np.asarray(v) for k, v in raw.items()}
        if "object-state" in self.raw_obs:
            self.raw_obs["object"] = self.raw_obs["object-state"]

    def obs_dict(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Current observation as robomimic-named float arrays (any robosuite low-dim key may be asked for)."""
        keys = self.obs_keys if keys is None else keys
        return {k: np.asarray(self.raw_obs[k], dtype=np.float64).reshape(-1).copy() for k in keys}

    def _flat_obs(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.raw_obs[k]).reshape(-1) for k in self.obs_keys]).astype(np.float32)

    def camera_frames(self) -> dict[str, np.ndarray]:
        """The current frame of every camera as robomimic's datasets store it: ``<camera>_image`` -> (H, W, 3) uint8,
        upright."""
        return {f"{c}_image": np.ascontiguousarray(self.raw_obs[f"{c}_image"][::-1]) for c in self.cameras}

    def _observation(self) -> np.ndarray | dict[str, np.ndarray]:
        if not self.cameras:
            return self._flat_obs()
        frames = self.camera_frames()
        image = np.stack([frames[f"{c}_image"].transpose(2, 0, 1) for c in self.cameras])
        return {"obs": self._flat_obs(), "image": image}

    def is_success(self) -> bool:
        return bool(self._env._check_success())

    def get_state(self) -> np.ndarray:
        """Flat MuJoCo state [time, qpos, qvel] (robomimic's ``states``)."""
        return np.asarray(self._env.sim.get_state().flatten(), dtype=np.float64)

    def set_state(self, state: np.ndarray) -> np.ndarray:
        """Load a flat MuJoCo state into the current episode and return the observation there."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.size != self.state_dim:
            raise DatasetError(
                f"initial_state has {state.size} values but robosuite {self.task} expects {self.state_dim}"
            )
        sim = self._env.sim
        sim.set_state_from_flattened(state)
        sim.forward()
        for robot in self._env.robots:
            controller = getattr(robot, "controller", None)
            if controller is not None and hasattr(controller, "reset_goal"):
                controller.update(force=True)
                controller.reset_goal()
        self._set_raw(self._env._get_observations(force_update=True))
        return self._observation()

    # -- gymnasium API -------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        placement_seed = int(seed) if seed is not None else int(self.np_random.integers(0, 2**31 - 1))
        saved = np.random.get_state()
        try:
            np.random.seed(placement_seed % (2**32))
            raw = self._env.reset()
        finally:
            np.random.set_state(saved)
        self._set_raw(raw)
        obs = self._observation()
        initial_state = (options or {}).get("initial_state")
        if initial_state is not None:
            obs = self.set_state(initial_state)
        return obs, {"is_success": self.is_success()}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,):
            raise PcmError(f"action must have 7 values, got shape {action.shape}")
        raw, reward, _, _ = self._env.step(action)
        self._set_raw(raw)
        success = self.is_success()
        terminated = bool(success and self.terminate_on_success)
        return self._observation(), float(reward), terminated, False, {"is_success": success}

    def render(self):
        if not self.can_render:
            return None
        h, w = self.render_size
        img = self._env.sim.render(width=w, height=h, camera_name=self.render_camera)
        return np.ascontiguousarray(img[::-1])  # OpenGL images are bottom-up

    def close(self):
        env = getattr(self, "_env", None)
        if env is not None:
            try:
                env.close()
            except Exception:  # pragma: no cover - GL teardown noise at exit
                pass
            self._env = None
