"""`pcm`: the command-line entry point. Every subcommand takes Hydra-style key=value overrides.

    pcm data info PATH [--json]
    pcm train task=pusht dataset.path=... train.steps=200 output_dir=...

User errors (bad files, unknown keys, missing devices) print one line on stderr and exit with status 2.
Set PCM_DEBUG=1 to see full tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pcm_policy.errors import PcmError  # noqa: E402

EXIT_USER_ERROR = 2


def _cmd_data_info(args: argparse.Namespace) -> int:
    from pcm_policy.data.info import dataset_info

    info = dataset_info(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['path']}: {info['format']}, {info['episodes']} episodes, {info['steps']} steps")
        for name, shape in info["arrays"].items():
            print(f"  {name}: {shape}")
    return 0


def _compose(command: str, overrides: Sequence[str]) -> dict:
    from pcm_policy.config import compose, resolve_path

    cfg = compose(command, overrides)
    dataset_path = (cfg.get("dataset") or {}).get("path")
    if isinstance(dataset_path, str) and dataset_path:
        cfg["dataset"]["path"] = str(resolve_path(dataset_path))
    for key in ("checkpoint", "base"):  # shipped checkpoints resolve from the repository root too
        if isinstance(cfg.get(key), str) and cfg[key]:
            cfg[key] = str(resolve_path(cfg[key]))
    return cfg


def _start(command: str, cfg: dict) -> None:
    """Check every option against the config and the checkpoint, then set up the process; nothing is written."""
    from pcm_policy.runtime import set_deterministic, set_threads
    from pcm_policy.validation import validate

    validate(command, cfg)
    set_deterministic(cfg.get("deterministic") or os.environ.get("PCM_DETERMINISTIC"))
    set_threads(cfg.get("threads"))


def _cmd_train(cfg: dict) -> int:
    from pcm_policy.training import train

    metrics = train(cfg)
    if "checkpoint" not in metrics:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"checkpoint: {metrics['checkpoint']}")
    print(f"metrics: {os.path.join(cfg['output_dir'], 'metrics.json')}")
    return 0


def _cmd_eval(cfg: dict) -> int:
    from pcm_policy.evaluation import evaluate

    m = evaluate(cfg)
    cov = f", mean max coverage {m['mean_max_coverage']:.3f}" if "mean_max_coverage" in m else ""
    lo, hi = m["success_ci95"]
    print(f"{m['task']}: success {m['success_rate']:.2f} (95% Wilson interval [{lo:.2f}, {hi:.2f}]), "
          f"score {m['score']:.3f} over {m['episodes']} episode{'s' if m['episodes'] != 1 else ''}{cov}")
    for video in m.get("videos", []):
        print(f"video: {video}")
    print(f"metrics: {os.path.join(cfg['output_dir'], 'metrics.json')}")
    return 0


def _cmd_collect(cfg: dict) -> int:
    task = cfg["task"]["name"]
    suffix = ".zarr" if cfg["dataset"]["kind"] == "pusht_zarr" else ".hdf5"
    path = os.path.join(cfg["output_dir"], cfg.get("output_name") or f"{task}_expert{suffix}")
    common = dict(seed=cfg["seed"], keep_failed=cfg["keep_failed"], max_steps=cfg["task"]["max_steps"],
                  overwrite=bool(cfg.get("overwrite")))
    if task == "pusht":
        from envs.collect_pusht import collect_pusht

        stats = collect_pusht(path, cfg["episodes"], images=cfg["images"], **common)
    else:
        from envs.collect_robomimic import collect_robomimic

        stats = collect_robomimic({"lift": "Lift", "can": "PickPlaceCan"}[task], path, cfg["episodes"], **common)
    from pcm_policy.atomic import atomic_write_text

    metrics = os.path.join(cfg["output_dir"], "metrics.json")
    if stats.get("already_complete"):
        print(f"{path}: already complete ({stats['episodes']} episodes, {stats['steps']} steps); "
              "nothing to do (overwrite=true collects it again)")
    if not stats.get("already_complete") or not os.path.exists(metrics):  # (killed before writing the metrics)
        atomic_write_text(metrics, json.dumps({"command": "collect", "task": task, "path": path, **stats},
                                              indent=2, default=str))
    print(f"dataset: {path}")
    return 0


def _cmd_train_pcm(cfg: dict) -> int:
    from pcm_policy.pcm.training import train_pcm

    m = train_pcm(cfg)
    if "checkpoint" not in m:  # a torchrun rank other than 0: rank 0 reports
        return 0
    for name in ("picard", "pcm", "pcm_lora"):
        if name in m["after"]:
            b, a = m["before"][name], m["after"][name]
            print(f"{name:9s} iterations {b['iterations_mean']:.2f} -> {a['iterations_mean']:.2f}  "
                  f"max |err| vs sequential {a['max_abs_err_vs_sequential']:.2e}")
    print(f"checkpoint: {m['checkpoint']}")
    print(f"metrics: {os.path.join(cfg['output_dir'], 'metrics.json')}")
    return 0


def _cmd_bench(cfg: dict) -> int:
    from pcm_policy.bench import run_bench

    run_bench(cfg)
    out = cfg["output_dir"]
    print(open(os.path.join(out, "bench.md")).read())
    for name in ("bench.json", "bench.md", "bench.png"):
        print(f"{name}: {os.path.join(out, name)}")
    return 0


def _cmd_demo(cfg: dict) -> int:
    from pcm_policy.demo import run_demo

    run_demo(cfg)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pcm_policy.checkpoint import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.output, args.dtype)
    size = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    print(f"exported {args.checkpoint} -> {path} ({args.dtype}, {size:.1f} MB)")
    return 0


def _run_composed(command: str, handler: Callable[[dict], int], args: argparse.Namespace) -> int:
    cfg = _compose(command, args.overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    _start(command, cfg)
    return handler(cfg)


def build_parser() -> argparse.ArgumentParser:
    """The `pcm` argument parser: `data info`, `export`, and the Hydra-override commands (`train`, `eval`,
    `collect`, `train-pcm`, `bench`, `demo`); each subparser's `func` runs its command on the parsed args."""
    parser = argparse.ArgumentParser(prog="pcm", description="Fast, exact diffusion-policy control (Picard Consistency Models).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="inspect datasets", description="Inspect demonstration datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    info = data_sub.add_parser("info", help="summarise a PushT zarr or robomimic hdf5",
                               description="Print episodes, steps and array shapes of a PushT zarr replay buffer "
                                           "(directory or .zarr.zip) or a robomimic low-dim hdf5 file.")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_data_info)

    export = sub.add_parser("export", help="compact copy of a checkpoint for shipping (fp16, no train state)",
                            description="Write a compact copy of a checkpoint: weights cast to --dtype (the normalizer "
                                        "stays float32), no optimizer state. Train PCMs against the exported copy.")
    export.add_argument("checkpoint", help="run directory or checkpoint directory")
    export.add_argument("output", help="output checkpoint directory")
    export.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    export.set_defaults(func=_cmd_export)

    def overrides_command(name: str, func: Callable, help_text: str, keys: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=f"{help_text}\n\nCommon overrides:\n{keys}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides (configs/%s.yaml)" % name.replace("-", "_"))
        p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
        p.set_defaults(func=lambda args: _run_composed(name.replace("-", "_"), func, args))
        return p

    overrides_command("train", _cmd_train, "Train a Diffusion-Policy action head (DDPM) on a dataset.",
                      "  task=pusht|lift|can  policy=unet_small|unet_dp  dataset.path=FILE  train.steps=N\n"
                      "  train.batch_size=N  train.checkpoint_every=N  train.init_from=CKPT  seed=N  device=auto|cpu|cuda  output_dir=DIR")
    overrides_command("eval", _cmd_eval, "Closed-loop evaluation on the test seeds (100000+i), with videos.",
                      "  checkpoint=DIR  policy=checkpoint|expert  sampler=sequential|ddim|picard|picard_aa|pcm|pcm_lora|pcm_lora_aa\n"
                      "  task=pusht|lift|can  episodes=50  n_envs=10  vector=sync|async  videos=2  output_dir=DIR")
    overrides_command("collect", _cmd_collect, "Record scripted-expert demonstrations in the real dataset formats.",
                      "  task=pusht|lift|can  episodes=N  seed=0  keep_failed=false  images=false  overwrite=false  output_dir=DIR\n"
                      "  (re-running after an interruption resumes at the next episode)")
    overrides_command("train-pcm", _cmd_train_pcm, "Picard Consistency Training: fit a PCM (LoRA or full) to a base policy.",
                      "  base=CKPT  mode=lora|full  lora_rank=64  scheduler=ddim|ddpm  steps=10  start=x_T|noise_sum|x0_chain  trajectories=8192\n"
                      "  epochs=20  batch_size=32  eval_tol=0.1  stiffness=null  device=auto  output_dir=DIR")
    overrides_command("bench", _cmd_bench, "Latency benchmark: sequential DDPM/DDIM, Picard, PCM and PCM-LoRA side by side.",
                      "  checkpoint=DIR  pcm.ddpm100=DIR  pcm_lora.ddim10=DIR  bases=[ddpm100,ddim10,ddim16]\n"
                      "  chunks=1000  tol=0.1  window=null  threads=1  episodes=0  device=auto  output_dir=DIR")
    overrides_command("demo", _cmd_demo, "The main job: closed-loop PushT with PCM-LoRA, then a latency comparison.",
                      "  checkpoint=DIR  pcm_lora.ddim10=DIR  episodes=5  chunks=200  task=pusht|lift|can  device=auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `pcm` command (the console-script entry point).

    Args:
        argv: the arguments after the program name; None reads `sys.argv`.

    Returns:
        The exit status: 0 on success, 2 (`EXIT_USER_ERROR`) after a `PcmError` (one line on stderr), 130 on
        Ctrl-C, 1 after any other exception (one line on stderr; `PCM_DEBUG=1` re-raises it instead).

    Raises:
        SystemExit: from argparse, status 2 for a usage error and 0 for `--help`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PcmError as e:
        print(f"pcm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pcm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: keep it to one line unless debugging
        if os.environ.get("PCM_DEBUG"):
            raise
        print(f"pcm: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set PCM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
