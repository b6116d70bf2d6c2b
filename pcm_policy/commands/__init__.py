"""One module per `pcm` command. Each holds a `Config` dataclass, built and checked from the composed Hydra config
by `Config.from_hydra` (every option, against the checkpoints it names, before any work), and a `run(config)`
that does the work with the library and prints the result. `run_command` composes, checks, sets up the process
and runs; `pcm_policy.cli` only parses arguments and dispatches here.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping, Sequence

from pcm_policy.config import compose
from pcm_policy.paths import resolve_path

# The Hydra-override commands: name -> (its module here, also the name of the configs/<module>.yaml it composes;
# help line; common overrides for `--help`). Modules load on use, so `pcm train` never imports the simulators
# that `pcm eval` needs. `data` and `export` take plain arguments (their modules register their own parsers).
COMMANDS = {
    "train": ("train", "Train a Diffusion-Policy action head (DDPM) on a dataset.",
              "  task=pusht|lift|can  policy=unet_small|unet_dp  dataset.path=FILE  train.steps=N\n"
              "  train.batch_size=N  train.checkpoint_every=N  train.init_from=CKPT  seed=N  device=auto|cpu|cuda  "
              "output_dir=DIR"),
    "eval": ("eval", "Closed-loop evaluation on the test seeds (100000+i), with videos.",
             "  checkpoint=DIR  policy=checkpoint|expert  sampler=auto|sequential|ddim|picard|picard_aa|pcm|pcm_lora|"
             "pcm_lora_aa\n  task=pusht|lift|can  episodes=50  n_envs=10  vector=sync|async  videos=2  output_dir=DIR\n"
             "  backend=torch|onnx|auto  server=ws://HOST:PORT (actions from `pcm serve`)"),
    "collect": ("collect", "Record scripted-expert demonstrations in the real dataset formats.",
                "  task=pusht|lift|can  episodes=N  seed=0  keep_failed=false  images=false  overwrite=false  "
                "output_dir=DIR\n  (re-running after an interruption resumes at the next episode)"),
    "train-pcm": ("train_pcm", "Picard Consistency Training: fit a PCM (LoRA or full) to a base policy.",
                  "  base=CKPT  mode=lora|full  lora_rank=64  scheduler=ddim|ddpm  steps=10  start=x_T|noise_sum|"
                  "x0_chain  trajectories=8192\n  epochs=20  batch_size=32  eval_tol=0.1  stiffness=null  device=auto  "
                  "output_dir=DIR"),
    "train-encoder": ("train_encoder", "An image policy from a low-dim one: a camera encoder regressed onto the "
                      "state the low-dim policy sees, joined to its action network exactly.",
                      "  task=pusht_image  head=CKPT (a low-dim policy of the same env)  steps=4000  batch_size=128  "
                      "lr=1e-3\n  vision.num_keypoints=32  threads=1  output_dir=DIR"),
    "bench": ("bench", "Latency benchmark in ms: sequential DDPM/DDIM, Picard, PCM and PCM-LoRA on each backend.",
              "  checkpoint=DIR  pcm.ddpm100=DIR  pcm_lora.ddim10=DIR  schedules=[ddpm100,ddim10,ddim16]\n"
              "  backends=[torch,onnx,auto]  chunks=1000  tol=0.1  window=null  threads=1  episodes=0  "
              "peak_gflops=null  observations=FILE  device=auto  output_dir=DIR"),
    "serve": ("serve", "Serve a policy to robots on openpi's websocket protocol (docs/serving.md).",
              "  checkpoint=DIR  sampler=auto|ddim|picard|pcm_lora|...  pcm=DIR  backend=torch|onnx|auto  budget_ms=null\n"
              "  host=127.0.0.1  port=8000  threads=1  seed=0  max_batch=16  (key: PCM_SERVE_API_KEY)"),
    "serve-bench": ("serve_bench", "Round trips and batching of `pcm serve` with 1 and N robots on 127.0.0.1.",
                    "  checkpoint=DIR  sampler=ddim|...  clients=[1,4]  rate_hz=null  requests=200  max_seconds=60  "
                    "threads=1\n  output_dir=DIR"),
    "demo": ("demo", "The main job: the fastest exact sampler on this machine (sampler=auto), closed-loop PushT with "
             "it, then a latency comparison on every backend.",
             "  checkpoint=DIR  pcm_lora.ddim10=DIR  sampler=auto|pcm_lora|...  backends=[torch,onnx,auto]  "
             "episodes=5  chunks=50\n  task=pusht|lift|can  device=auto"),
}


def command_module(name: str) -> ModuleType:
    """The module of command `name` (a key of `COMMANDS`)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def compose_command(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Command `name`'s composed Hydra config (`configs/<config>.yaml` with `overrides`), with its checkpoint and
    dataset paths resolved (a relative path is taken from the working directory, else from the repository root,
    where the shipped data lives).

    Raises:
        ConfigError: an override Hydra refuses (unknown key or group option), as one line.
    """
    cfg = compose(COMMANDS[name][0], overrides)
    dataset_path = (cfg.get("dataset") or {}).get("path")
    if isinstance(dataset_path, str) and dataset_path:
        cfg["dataset"]["path"] = str(resolve_path(dataset_path))
    for key in ("checkpoint", "base"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            cfg[key] = str(resolve_path(cfg[key]))
    return cfg


def build_config(name: str, overrides: Sequence[str] = ()):
    """Command `name`'s checked `Config` for `overrides` (nothing is run, nothing written).

    Raises:
        ConfigError, CheckpointError, DatasetError: an option the command refuses, as one line naming it.
    """
    return command_module(name).Config.from_hydra(compose_command(name, overrides))


def run_command(name: str, overrides: Sequence[str] = ()) -> Any:
    """Compose, check every option, set up the process (determinism, threads), then run command `name`.

    Returns:
        What the command's `run` returns (its metrics or report).

    Raises:
        PcmError: bad input, before any work (or a refusal the data forces once read).
    """
    return run_composed(name, compose_command(name, overrides))


def run_composed(name: str, cfg: Mapping[str, Any]) -> Any:
    """Check every option of an already composed config (e.g. one edited after `compose_command`), set up the
    process, then run command `name` (see `run_command`)."""
    module = command_module(name)
    config = module.Config.from_hydra(cfg)
    runtime = getattr(config, "runtime", None)
    if runtime is not None:
        runtime.apply()
    return module.run(config)
