"""Round counts of Picard, Anderson-accelerated Picard and PCM switching on the shipped PushT base (no timings).

For every observation (validation windows first), schedule and sampler variant: batched rounds per chunk, and the
chunk's max-abs deviation from the sequential sample with the same noise (normalized action units).  Prints one
markdown table per schedule and tolerance: mean rounds, mean evaluations, exact fraction (converged by the base
map), max and p99 of the per-chunk deviation.

    PYTHONPATH=. .venv/bin/python scripts/measure_rounds.py --obs 32 --tols 0.1
    PYTHONPATH=. .venv/bin/python scripts/measure_rounds.py --obs 32 --tols 0.05 0.03 --memory 3 5 --damping 0.5 \
        --triangular 1 --schedules ddpm100 --starts noise_sum
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pcm_policy.checkpoint import load_policy
from pcm_policy.observations import dataset_observations
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.sampling import (AndersonConfig, StepCoefficients, sample_lora_switched, sample_picard,
                                 sample_sequential)

SCHEDULES = {"ddim10": ("ddim", 10), "ddpm100": ("ddpm", 100)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="data/pusht/base")
    p.add_argument("--pcm", default="data/pusht/pcm_lora_ddim10", help="LoRA PCM for DDIM-10 rows ('' to skip)")
    p.add_argument("--pcm-ddpm", default="", help="LoRA PCM for DDPM-100 rows ('' to skip)")
    p.add_argument("--obs", type=int, default=32, help="observations (validation windows first)")
    p.add_argument("--offset", type=int, default=0, help="skip this many observations (a second, disjoint set)")
    p.add_argument("--tols", type=float, nargs="+", default=[0.1])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--memory", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--damping", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--triangular", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    p.add_argument("--starts", nargs="+", default=["x_T", "noise_sum"])
    p.add_argument("--no-picard", action="store_true", help="skip the plain Picard rows")
    p.add_argument("--json", type=Path, default=None, help="also write all rows here")
    return p.parse_args(argv)


def pcm_path(args, schedule) -> str:
    return args.pcm if schedule == "ddim10" else args.pcm_ddpm


def variants(args, schedule):
    """(label, start, AndersonConfig | None, uses_pcm) for one schedule.  DDIM has no noise: its noise_sum start is
    x_T, so it is measured once.  The PCM rows use the start the shipped PCM was trained from (x_T)."""
    starts = list(dict.fromkeys("x_T" if s == "noise_sum" and SCHEDULES[schedule][0] == "ddim" else s
                                for s in args.starts))
    aa = [AndersonConfig(memory=m, damping=b, triangular=bool(t))
          for t, m, b in itertools.product(args.triangular, args.memory, args.damping)]
    out = []
    for start in starts:
        if not args.no_picard:
            out.append(("picard", start, None, False))
        out += [(f"aa m={c.memory} b={c.damping} {'tri' if c.triangular else 'plain'}", start, c, False) for c in aa]
    if pcm_path(args, schedule):
        out.append(("pcm_lora", "x_T", None, True))
        out += [(f"pcm_lora + aa m={c.memory} b={c.damping} {'tri' if c.triangular else 'plain'}", "x_T", c, True)
                for c in aa]
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    policy, _ = load_policy(args.base, "cpu")
    train_obs, val_obs = dataset_observations(Path(args.base))
    obs = torch.cat([val_obs, train_obs])[args.offset : args.offset + args.obs]
    pcms = {}
    for schedule in args.schedules:
        if pcm_path(args, schedule):
            from pcm_policy.pcm.attach import load_pcm, pcm_denoiser

            net, _ = load_pcm(Path(pcm_path(args, schedule)), policy, "cpu")
            pcms[schedule] = pcm_denoiser(net, "pcm_lora")
    rows = []
    t0 = time.time()
    for schedule in args.schedules:
        kind, steps = SCHEDULES[schedule]
        cfg = SamplerConfig(name="picard", scheduler=kind, steps=steps)
        sch = policy.scheduler_for(cfg)
        coeffs = StepCoefficients.from_scheduler(sch, torch.device("cpu"), torch.float32)
        vs = variants(args, schedule)
        res = {(v[0], v[1], tol): {"rounds": [], "evals": [], "conv": [], "dev": []} for v in vs for tol in args.tols}
        for i in range(len(obs)):
            cond = policy.global_cond(obs[i : i + 1])
            x_T, noise = policy.make_noise(1, cfg, torch.Generator().manual_seed(args.offset + i))
            with torch.no_grad():
                ref = sample_sequential(policy.denoiser, sch, x_T, noise, cond)
            for (label, start, aa, uses_pcm), tol in itertools.product(vs, args.tols):
                kw = dict(tol=tol, anderson=aa, start=start, coeffs=coeffs, fixed_shape=False)
                if uses_pcm:
                    out, st = sample_lora_switched(pcms[schedule], sch, x_T, noise, cond, **kw)
                else:
                    out, st = sample_picard(policy.denoiser, sch, x_T, noise, cond, **kw)
                r = res[(label, start, tol)]
                r["rounds"].append(st.iterations)
                r["evals"].append(st.evaluations)
                r["conv"].append(st.converged)
                r["dev"].append((out - ref).abs().max().item())
            print(f"[{schedule}] obs {i + 1}/{len(obs)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        for tol in args.tols:
            print(f"\n### {schedule}, tol {tol}, {len(obs)} observations, batch 1, full window\n")
            print("| sampler | start | mean rounds | mean evals | exact frac | max dev | p99 dev |")
            print("|---|---|---|---|---|---|---|")
            for label, start, _, _ in vs:
                r = res[(label, start, tol)]
                dev = np.array(r["dev"])
                row = dict(schedule=schedule, tol=tol, sampler=label, start=start, rounds=float(np.mean(r["rounds"])),
                           evals=float(np.mean(r["evals"])), exact=float(np.mean(r["conv"])), dev_max=float(dev.max()),
                           dev_p99=float(np.quantile(dev, 0.99)), n=len(dev))
                rows.append(row)
                print(f"| {label} | {start} | {row['rounds']:.2f} | {row['evals']:.0f} | {row['exact']:.2f} | "
                      f"{row['dev_max']:.1e} | {row['dev_p99']:.1e} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
