"""Hydra configs: compose `configs/<command>.yaml` with key=value overrides, as plain dicts.

Unknown keys and unknown group options become one-line `ConfigError`s naming the key. The task configs read
their defaults from the task registry through the `${registry:<task>,<field>}` resolver registered here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pcm_policy.errors import ConfigError
from pcm_policy.paths import REPO_ROOT
from pcm_policy.tasks import task_field

CONFIG_DIR = Path(os.environ.get("PCM_CONFIG_DIR", REPO_ROOT / "configs"))


def compose(command: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Compose `configs/<command>.yaml` (under `CONFIG_DIR`, `$PCM_CONFIG_DIR` if set) with Hydra overrides.

    Args:
        command: the config name, e.g. `train`, `train_pcm`.
        overrides: Hydra overrides, each `key=value` (or `+key=value`, `~key`; group options like `task=pusht`).

    Returns:
        The composed config as plain nested dicts/lists, interpolations resolved.

    Raises:
        ConfigError: an override without `=`, an unknown key or group option, or any other Hydra/OmegaConf
            error, as one line naming the key where one can be found.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides are key=value (e.g. train.steps=200)")
    if not OmegaConf.has_resolver("registry"):
        OmegaConf.register_new_resolver("registry", task_field)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=command, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e, overrides)) from None


def _one_line(error: Exception, overrides: Sequence[str]) -> str:
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Could not override" in text or "not in struct" in text or "Key '" in text:
        for item in overrides:
            key = item.split("=", 1)[0].lstrip("+~")
            if f"'{key}'" in text or f"'{key.split('.')[-1]}'" in text:
                return f"unknown config key '{key}' (override '{item}')"
    if "Could not find" in text:
        head = [line for line in lines if not line.startswith("Config search path")]
        options = [line for line in head[2:] if line and ":" not in line]
        return f"{head[0]}; {head[1].rstrip(':')}: {', '.join(options)}" if len(head) > 1 else head[0]
    return lines[0] if lines else type(error).__name__
