"""Held-out rounds of one or more PCMs on a given set of observation histories (no timings).

For each PCM: Picard, PCM (output space) and PCM-LoRA (weight space) rounds to converge at batch 1, and with
`--accel`, the same with Anderson-accelerated base rounds; plus the per-chunk max-abs deviation from the
sequential sample (normalized units). The observations come from a safetensors file written by
`pcm train-pcm observations=closed_loop` (`<run>/observations.safetensors`, key `held_out`), or from the base's
dataset windows (validation first) when `--observations` is not given. Used to compare PCMs trained on dataset
windows with PCMs trained on closed-loop states, on the same closed-loop states:

    PYTHONPATH=. .venv/bin/python scripts/pcm_rounds.py --pcm data/pusht/pcm_lora_ddim10 outputs/pcm_cl \\
        --observations outputs/pcm_cl/observations.safetensors --scheduler ddim --steps 10
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pcm_policy.checkpoint import load_policy
from pcm_policy.observations import dataset_observations
from pcm_policy.pcm.attach import load_pcm
from pcm_policy.pcm.held_out import evaluate_iterations
from pcm_policy.sampler_config import SamplerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="data/pusht/base")
    ap.add_argument("--pcm", nargs="+", required=True, help="PCM checkpoint directories")
    ap.add_argument("--observations", default=None, help="safetensors file with a `held_out` (N, To, Do) tensor")
    ap.add_argument("--key", default="held_out")
    ap.add_argument("--n", type=int, default=32, help="observations used (the first n)")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--start", default="x_T")
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--accel", action="store_true", help="also Anderson-accelerated base rounds (memory 2)")
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, _ = load_policy(args.base, "cpu")
    if args.observations:
        obs = load_file(args.observations)[args.key][: args.n]
    else:
        train_obs, val_obs = dataset_observations(Path(args.base))
        obs = torch.cat([val_obs, train_obs])[: args.n]
    sampler = SamplerConfig(name="picard", scheduler=args.scheduler, steps=args.steps, start=args.start)
    accel = {"accel": "anderson", "memory": 2, "damping": args.damping} if args.accel else None
    report = {}
    for path in args.pcm:
        net, card = load_pcm(Path(path), policy, "cpu")
        rows = evaluate_iterations(policy, net, sampler, obs, tol=args.tol, window=None, stiffness=None,
                                   seed=args.seed, accel=accel)
        report[path] = rows
        for name, r in rows.items():
            print(f"{path:40s} {name:12s} rounds {r['iterations_mean']:5.2f}  evals {r['evaluations_mean']:7.1f}  "
                  f"p99 dev {r['abs_err_p99_vs_sequential']:.1e}  ({r['observations']} obs, trained on "
                  f"{card.get('observations', 'dataset')})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
