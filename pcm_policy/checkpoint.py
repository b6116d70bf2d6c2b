"""Checkpoints: a directory per save, written atomically.

    <run>/checkpoints/step_000200/
        policy.yaml          what the weights are: task, policy shape, kind (base | pcm)
        policy.safetensors   evaluation weights (EMA) + normalizer statistics
        config.yaml          the fully resolved run config
        train_state.pt       online weights, optimizer, LR schedule, EMA, step, RNG (for resuming; optional)

`load_policy` accepts a checkpoint directory or a run directory (then it takes the latest checkpoint). An image
policy assembled from a low-dim head (`pcm train-encoder`) and exported with `--link-head` stores its encoder only:
its card's `head` names the head's checkpoint and fingerprint, and loading rewires that head again.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pcm_policy.atomic import atomic_path
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import CheckpointError, ConfigError, PcmError
from pcm_policy.options import writable_dir
from pcm_policy.paths import resolve_path
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.model.vision import build_vision_encoder
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.state_encoder import assemble_image_policy
from pcm_policy.tasks import TASKS, cameras_of_env

POLICY_CARD = "policy.yaml"
POLICY_WEIGHTS = "policy.safetensors"
RUN_CONFIG = "config.yaml"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def step_dir(run_dir: str | Path, step: int) -> Path:
    """`<run_dir>/checkpoints/step_<step, 7 digits>`, the directory of the checkpoint saved at training step `step`."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(
    final_dir: str | Path,
    card: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a crash leaves either the old directory or the new one).

    Args:
        final_dir: the checkpoint directory; an existing one is replaced.
        card: what the weights are (task, policy shape, kind), written as `policy.yaml`.
        weights: the evaluation weights (and `normalizer.*` statistics), any dtype/device, written to
            `policy.safetensors` from the CPU.
        config: the resolved run config (`config.yaml`); None writes none.
        train_state: what resuming needs (`train_state.pt`, `torch.save`); None writes none.
        extra_weights: further safetensors files, file name -> tensors.

    Returns:
        `final_dir` as a Path.

    Raises:
        OSError: the directory cannot be written (nothing is left behind).
    """
    final_dir = Path(final_dir)
    with atomic_path(final_dir) as tmp:
        tmp.mkdir()
        (tmp / POLICY_CARD).write_text(yaml.safe_dump(dict(card), sort_keys=False))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / POLICY_WEIGHTS)
        for name, tensors in (extra_weights or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / name)
        if config is not None:
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(dict(config), sort_keys=False))
        if train_state is not None:
            torch.save(dict(train_state), tmp / TRAIN_STATE)
    return final_dir


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories of an interrupted save are ignored).

    Returns:
        (step, directory) of every `checkpoints/step_*` holding both `policy.safetensors` and `policy.yaml`;
        empty when there is no `checkpoints/`.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / POLICY_WEIGHTS).is_file() and (p / POLICY_CARD).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step (`list_checkpoints`), or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints of `run_dir`; `keep` <= 0 deletes nothing.

    Removal errors are ignored (a checkpoint that cannot be removed stays).
    """
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself when it holds `policy.safetensors`, else the latest checkpoint
    of the run directory it is.

    Raises:
        CheckpointError: `path` does not exist, or is neither a checkpoint nor a run holding one.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if (path / POLICY_WEIGHTS).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: not a checkpoint (no {POLICY_WEIGHTS}) and holds no checkpoints/step_*")
    return latest


def read_card(ckpt: Path) -> dict[str, Any]:
    """The card (`policy.yaml`) of checkpoint directory `ckpt`, as a dict with at least a `policy` section.

    Raises:
        CheckpointError: the card is missing, unreadable, not YAML, or has no `policy` section.
    """
    try:
        card = yaml.safe_load((ckpt / POLICY_CARD).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt / POLICY_CARD}: unreadable ({type(e).__name__})") from None
    if not isinstance(card, dict) or "policy" not in card:
        raise CheckpointError(f"{ckpt / POLICY_CARD}: not a pcm-policy card (no 'policy' section)")
    return card


@dataclass(frozen=True)
class Card:
    """A checkpoint's card (`policy.yaml`) together with the option that named it, and the rules about cards.

    Attributes:
        key: the config option that names the checkpoint (e.g. `checkpoint`, `base`, `pcm_lora.ddim10`).
        given: the path as the user gave it.
        path: the checkpoint directory (a run directory resolves to its latest checkpoint).
        data: the card as a dict (at least a `policy` section).
    """

    key: str
    given: str
    path: Path
    data: dict

    @classmethod
    def open(cls, key: str, path) -> "Card":
        """The card of the checkpoint option `key` names (a run or checkpoint directory); reads no weights.

        Raises:
            ConfigError: no path given.
            CheckpointError: no checkpoint or an unreadable card there; the message starts with `key`.
        """
        if not path:
            raise ConfigError(f"{key}: no checkpoint given ({key}=<run or checkpoint dir>)")
        try:
            ckpt = resolve_checkpoint(resolve_path(path))
            return cls(key, str(path), ckpt, read_card(ckpt))
        except CheckpointError as e:
            raise CheckpointError(f"{key}: {e}") from None

    @classmethod
    def open_base(cls, key: str, path, task: str | None = None) -> "Card":
        """The card of a base policy (`open`), for `task` when given.

        Raises:
            ConfigError: no path given.
            CheckpointError: no readable checkpoint there, a PCM checkpoint, or one trained for another task.
        """
        card = cls.open(key, path)
        if card.kind == "pcm":
            raise CheckpointError(f"{key}={path}: is a PCM checkpoint; give the base policy it was trained for "
                                  f"({card.data.get('base')})")
        if task is not None and card.task is None and card.observation_kind is not None:
            parts = ", ".join(f"{p['name']} {p['size']}" for p in card.data["observation"].get("layout", []))
            raise CheckpointError(f"{key}={path}: the policy expects observation {card.observation_kind!r} ({parts}), "
                                  f"which no env here gives (task={task})")
        if task is not None and card.task != task:
            raise CheckpointError(f"{key}={card.path}: checkpoint is for task {card.task!r}, not task={task!r}")
        return card

    @classmethod
    def open_pcm(cls, key: str, path) -> "Card":
        """The card of a PCM checkpoint (`open`).

        Raises:
            ConfigError: no path given.
            CheckpointError: no readable checkpoint there, or not a PCM.
        """
        card = cls.open(key, path)
        if card.kind != "pcm":
            raise CheckpointError(f"{key}={path}: not a PCM checkpoint (kind={card.kind!r})")
        return card

    @property
    def kind(self) -> str | None:
        """`base` or `pcm`."""
        return self.data.get("kind")

    @property
    def task(self) -> str | None:
        """The task the policy was trained for."""
        return self.data.get("task")

    @property
    def observation_kind(self) -> str | None:
        """The observation layout the policy expects (`observation.kind` of imported cards); None: its task's own."""
        return (self.data.get("observation") or {}).get("kind")

    @property
    def observation_parts(self) -> list[tuple[str, int]] | None:
        """The (name, size) parts of the observation the card lists (imported policies), else None."""
        layout = (self.data.get("observation") or {}).get("layout")
        return [(p["name"], int(p["size"])) for p in layout] if layout else None

    def check_closed_loop(self) -> None:
        """The policy can act in this project's envs.

        Raises:
            CheckpointError: absolute-action robomimic policies (their 10-d rot6d actions need an absolute
                controller the envs here do not run yet).
        """
        if self.data.get("abs_action"):
            raise CheckpointError(f"{self.key}={self.given}: an absolute-action policy (abs_action: true); its "
                                  "actions need an absolute controller the envs here do not run yet")

    @property
    def cameras(self) -> tuple[str, ...]:
        """The camera images the policy sees (its `policy.camera_keys`; empty for a low-dim policy)."""
        return tuple((self.data.get("policy") or {}).get("camera_keys") or ())

    def check_env_gives_cameras(self, env_id: str) -> None:
        """The env an episode runs in gives the images the policy sees (a low-dim env for a low-dim policy).

        Raises:
            ConfigError: naming the missing camera input (or the images a low-dim policy cannot take) and the env.
        """
        layouts = cameras_of_env(env_id)
        if layouts is None or self.cameras in layouts:
            return
        given = layouts[0]
        if self.cameras:
            missing = [c for c in self.cameras if c not in given] or list(self.cameras)
            gives = ", ".join(given) or "low-dim observations only"
            raise ConfigError(f"{self.key}={self.given}: the policy needs camera image {', '.join(missing)}, which "
                              f"env {env_id} does not give (it gives {gives})")
        raise ConfigError(f"{self.key}={self.given}: a low-dim policy, but env {env_id} gives camera images "
                          f"({', '.join(given)}); use the task's low-dim env")

    @property
    def env_id(self) -> str | None:
        """The env the policy runs in: its task's env for its observation layout, else the card's `env_id`."""
        if self.task in TASKS:
            return TASKS[self.task].layout(self.observation_kind, self.key).env_id
        return self.data.get("env_id")

    @property
    def num_train_timesteps(self) -> int:
        """T of the policy's noise schedule (100, PolicyConfig's default, when the card leaves it out)."""
        return int((self.data.get("policy") or {}).get("noise_scheduler", {}).get("num_train_timesteps", 100))

    @property
    def pcm_start(self) -> str:
        """The Picard start a PCM was trained from (`x_T` for cards that predate the option)."""
        return self.data.get("start", "x_T")

    def check_policy_shape(self, ours: PolicyConfig) -> None:
        """This checkpoint's network has the shape of `ours`, every field compared with its default filled in
        (observation and action sizes aside: known only once a dataset is read).

        Raises:
            CheckpointError: an unreadable policy section, or naming every differing key with both values.
        """
        def values(config: PolicyConfig) -> dict[str, Any]:
            return {**asdict(config), "down_dims": list(config.down_dims)}

        try:
            theirs = values(PolicyConfig(**{"obs_dim": 1, "action_dim": 1, **self.data.get("policy", {})}))
        except (TypeError, PcmError) as e:
            raise CheckpointError(f"{self.key}={self.given}: invalid policy section in its card ({e})") from None
        mine = values(ours)
        diff = sorted(k for k in mine if k not in ("obs_dim", "action_dim") and theirs.get(k) != mine[k])
        if diff:
            raise CheckpointError(f"{self.key}={self.given}: checkpoint {self.path} has another policy shape "
                                  f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}; this run: "
                                  f"{', '.join(f'{k}={mine[k]!r}' for k in diff)})")

    def check_pcm_for(self, sampler: SamplerConfig, start_key: str | None = None) -> None:
        """This PCM suits `sampler`: trained for its schedule and start, and a LoRA one for weight-space switching.

        Args:
            sampler: the switching sampler's config.
            start_key: the option holding the sampler's start, for the message (None: the start is not checked).

        Raises:
            ConfigError: a PCM for another (scheduler, steps) or start, or a full PCM for `pcm_lora`.
        """
        if (self.data.get("scheduler"), self.data.get("steps")) != (sampler.scheduler, sampler.steps):
            raise ConfigError(f"{self.key}={self.given}: this PCM was trained for {self.data.get('scheduler')}"
                              f"{self.data.get('steps')}, the sampler runs {sampler.schedule}")
        if sampler.name == "pcm_lora" and self.data.get("mode") != "lora":
            raise ConfigError(f"{self.key}={self.given}: a full PCM; weight-space switching (pcm_lora) needs a LoRA "
                              "one (use pcm)")
        if start_key is not None:
            self.check_pcm_start(sampler, start_key)

    def check_pcm_start(self, sampler: SamplerConfig, start_key: str) -> None:
        """The sampler starts Picard where this PCM was trained to step from (its one step was learned from that
        X^0 only; another schedule is suboptimal but still exact after switching, another start is not meant).

        Raises:
            ConfigError: naming `start_key` and the start to set.
        """
        if sampler.start != self.pcm_start:
            raise ConfigError(f"{start_key}={sampler.start}: the PCM {self.given} was trained from "
                              f"start={self.pcm_start} (set {start_key}={self.pcm_start})")


def read_run_config(ckpt: Path) -> dict[str, Any]:
    """The run config (`config.yaml`) checkpoint directory `ckpt` was trained with; it names the dataset.

    Raises:
        CheckpointError: the checkpoint has no readable run config.
    """
    try:
        config = yaml.safe_load((Path(ckpt) / RUN_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {RUN_CONFIG}; cannot tell which dataset it was trained on") from None
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{Path(ckpt) / RUN_CONFIG}: unreadable ({type(e).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("dataset"), dict):
        raise CheckpointError(f"{Path(ckpt) / RUN_CONFIG}: not a run config (no 'dataset' section)")
    return config


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, in their stored dtypes, on `device`.

    Raises:
        CheckpointError: the file is missing, unreadable or corrupt.
    """
    try:
        return load_file(str(path), device=str(device))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None


def read_train_state(ckpt: Path) -> dict[str, Any] | None:
    """The resume state (`train_state.pt`) of checkpoint directory `ckpt`, loaded on the CPU with
    `weights_only=True`; None when the checkpoint has none.

    Raises:
        CheckpointError: the file is corrupt or unreadable.
    """
    path = ckpt / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise CheckpointError(f"{path}: corrupt train state ({type(e).__name__})") from None


def load_policy(path: str | Path, device: str | torch.device = "cpu", expect_task: str | None = None):
    """Rebuild a DiffusionPolicy (EMA weights) from a checkpoint or run directory.

    Args:
        path: a checkpoint directory, or a run directory (its latest checkpoint).
        device: where the policy is moved.
        expect_task: refuse a checkpoint whose card names another task; None accepts any.

    Returns:
        (policy in eval mode, float32 weights whatever the stored dtype; its card as a dict).

    Raises:
        CheckpointError: no checkpoint, an unreadable card or weights file, a card for another task, or an
            invalid `policy` section.
        PcmError: an inconsistent policy shape in the card, or weights that do not fit it.
        ConfigError: the normalizer and the card's sample clipping disagree.
        ValueError: malformed normalizer entries in the weights file.
    """
    ckpt = resolve_checkpoint(path)
    card = read_card(ckpt)
    if expect_task is not None and card.get("task") != expect_task:
        raise CheckpointError(f"{ckpt}: checkpoint is for task {card.get('task')!r}, not {expect_task!r}")
    try:
        config = PolicyConfig(**card["policy"])
    except TypeError as e:
        raise CheckpointError(f"{ckpt / POLICY_CARD}: invalid policy section ({e})") from None
    weights = read_weights(ckpt / POLICY_WEIGHTS)
    weights = {k: v.float() for k, v in weights.items()}  # shipped checkpoints may be stored in fp16
    if (card.get("head") or {}).get("linked"):
        weights = _linked_weights(ckpt, card, config, weights)
    policy = DiffusionPolicy(config, Normalizer())
    policy.load_weights(weights, source=str(ckpt / POLICY_WEIGHTS))
    policy.eval().to(device)
    return policy, card


def _linked_weights(ckpt: Path, card: Mapping[str, Any], config: PolicyConfig,
                    weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full weights of an image policy stored as its encoder + a link to its low-dim head (`--link-head`).

    Raises:
        CheckpointError: the head cannot be read, or its weights are not the ones the policy was assembled from.
    """
    link = card["head"]
    try:
        head, _ = load_policy(resolve_path(str(link["checkpoint"])))
    except (CheckpointError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: its action network is its head's ({link.get('checkpoint')}), which cannot "
                              f"be read: {e}") from None
    found = weights_fingerprint(head.model)
    if found != link.get("fingerprint"):
        raise CheckpointError(f"{ckpt}: its head {link['checkpoint']} has other weights (fingerprint {found}, "
                              f"assembled from {link.get('fingerprint')}); export the image policy again from its "
                              "full checkpoint")
    if config.vision_config is None:
        raise CheckpointError(f"{ckpt}: a linked head needs an image policy (policy.vision)")
    encoder = build_vision_encoder(config.vision_config)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    return assemble_image_policy(head, encoder, link["own_columns"], config.camera_keys,
                                 link.get("camera_weights")).weights()


def weights_fingerprint(model: torch.nn.Module, *more: torch.nn.Module) -> str:
    """A short hash of a network's weights (fp32 values), to tie a PCM to the exact base it was trained from.

    Args:
        model: the network (a base policy's action head).
        more: further networks its outputs depend on (an image policy's encoder: `DiffusionPolicy.trained_modules`);
            their entries are named `<i>.<name>` (i = 1, 2, ...), so a low-dim policy's hash is its head's alone.

    Returns:
        The first 16 hex digits of the SHA-256 of every state-dict entry (name, then fp32 bytes), sorted by name.
    """
    digest = hashlib.sha256()
    entries = dict(model.state_dict())
    for i, extra in enumerate(more, start=1):
        entries.update({f"{i}.{k}": v for k, v in extra.state_dict().items()})
    for name, tensor in sorted(entries.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "float16", link_head: bool = False) -> Path:
    """A compact copy for shipping: weights in `dtype` (normalizer and integer tensors kept), no training state.

    The exported weights are the policy from then on: PCMs must be trained against the exported copy (their
    base fingerprint is taken from the weights as loaded). The card gains `exported_from` and `weights_dtype`.

    Args:
        src: a checkpoint or run directory (its latest checkpoint).
        dst: the output checkpoint directory; it may replace an older checkpoint directory only.
        dtype: `float16`, `bfloat16` or `float32`.
        link_head: an image policy from `pcm train-encoder`: store its encoder only, and in the card's `head` a
            link to the low-dim head it was assembled from (`load_policy` rewires it again; the head's own dtype
            applies). The head must still hold the weights it was assembled from.

    Returns:
        `dst` as a Path.

    Raises:
        CheckpointError: `src` holds no readable checkpoint.
        ConfigError: an unknown `dtype`, or `dst` is the source, a folder holding it, a file, an unwritable
            place, or a non-empty directory that is not a checkpoint.
    """
    ckpt = resolve_checkpoint(src)
    card = read_card(ckpt)
    target = EXPORT_DTYPES.get(dtype)
    if target is None:
        raise ConfigError(f"dtype={dtype!r}: expected float16, bfloat16 or float32")
    check_output_dir("output", Path(dst), Path(src), ckpt, what="the checkpoint being exported")
    if link_head:
        link = card.get("head")
        if not isinstance(link, Mapping) or "fingerprint" not in link:
            raise ConfigError(f"--link-head: {ckpt} was not assembled from a low-dim head (`pcm train-encoder` "
                              "writes such checkpoints)")
        if link.get("linked"):
            raise ConfigError(f"--link-head: {ckpt} is already linked to its head")
        head, head_card = load_policy(resolve_path(str(link["checkpoint"])))
        if weights_fingerprint(head.model) != link["fingerprint"]:
            raise CheckpointError(f"--link-head: the head {link['checkpoint']} no longer holds the weights {ckpt} was "
                                  "assembled from; export the whole policy (without --link-head)")
        card = dict(card, head={**link, "linked": True, "weights_dtype": head_card.get("weights_dtype", "float32")})
    weights = read_weights(ckpt / POLICY_WEIGHTS)
    if link_head:  # the action network and the normalizer are the head's (the fingerprint is checked on loading)
        weights = {k: v for k, v in weights.items() if k.startswith("encoder.")}
    weights = {k: (v if k.startswith("normalizer.") or not v.is_floating_point() else v.to(target)) for k, v in weights.items()}
    config = yaml.safe_load((ckpt / RUN_CONFIG).read_text()) if (ckpt / RUN_CONFIG).is_file() else None
    card = dict(card, exported_from=str(ckpt), weights_dtype=dtype)
    return save_checkpoint(dst, card, weights, config=config)


def check_output_dir(key: str, dst: Path, *sources: Path, what: str = "its source") -> None:
    """A checkpoint directory to be written (option `key`) replaces at most an older checkpoint directory: never
    one of `sources`, a folder holding one, a file, or a directory of something else (save_checkpoint swaps the
    whole directory). Nothing is created.

    Raises:
        ConfigError: naming `key` and why (`what` names the source in the message).
    """
    writable_dir(key, dst)  # a directory, or creatable in a writable one
    target = dst.resolve()
    for protected in {p.resolve() for p in sources}:
        if target == protected or target in protected.parents:
            raise ConfigError(f"{key}={dst}: would replace {what} ({sources[0]}); choose a new directory")
    if dst.is_dir():
        if any(dst.iterdir()) and not ((dst / POLICY_WEIGHTS).is_file() and (dst / POLICY_CARD).is_file()):
            raise ConfigError(f"{key}={dst}: exists and is not a checkpoint directory (refusing to replace it)")
