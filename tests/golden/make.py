"""Golden outputs of the shipped PushT base and its LoRA PCM, and the one function that computes them.

`tests/golden/pusht_base.safetensors` holds fixed inputs (4 observation histories from the base's own dataset,
the initial and per-step noise of each schedule) and the chunks the shipped checkpoints give for them:
sequential DDIM-10 and DDPM-100, Picard chunks, and PCM steps (one switched sample capped at one iteration, in
output space and in weight space, plus a weight-space run to convergence). `tests/test_golden.py` recomputes
every output from the stored inputs and compares; a change to the network, the normalizer, the scheduler step
math or the samplers shows up there.

Regenerate it only on purpose (a deliberate change of the shipped checkpoints or of the outputs), from the
repository root, and say why in the commit:

    python -m tests.golden.make

Only public entry points are used (`load_policy`, `policy.sampler(config, pcm=...)`,
`policy.predict_chunk(obs, sampler=..., noise=(x_T, noise))`,
`load_pcm`), so internal refactors do not need a new artifact. Float32 on the CPU, 1 thread, torch backend.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pcm_policy.checkpoint import load_policy, weights_fingerprint
from pcm_policy.pcm.attach import load_pcm
from pcm_policy.sampler_config import SamplerConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "data" / "pusht" / "base"
PCM_LORA_DDIM10 = ROOT / "data" / "pusht" / "pcm_lora_ddim10"
GOLDEN = Path(__file__).with_name("pusht_base.safetensors")
COMMAND = "python -m tests.golden.make"

N_OBS = 4  # observation histories for the DDIM-10 cases
N_OBS_DDPM = 2  # the first two of them for the (100-step) DDPM-100 cases
NOISE_SEED = 0

# name -> (sampler, PCM to attach: None | "pcm" (output space) | "pcm_lora" (weight space), observations)
CASES: dict[str, tuple[SamplerConfig, str | None, int]] = {
    "sequential_ddim10": (SamplerConfig(name="sequential", scheduler="ddim", steps=10), None, N_OBS),
    "sequential_ddpm100": (SamplerConfig(name="sequential", scheduler="ddpm", steps=100), None, N_OBS_DDPM),
    "picard_ddim10": (SamplerConfig(name="picard", scheduler="ddim", steps=10, tol=0.1), None, N_OBS),
    "picard_ddim10_window4": (SamplerConfig(name="picard", scheduler="ddim", steps=10, tol=0.1, window=4), None, N_OBS),
    "picard_ddpm100_window25": (SamplerConfig(name="picard", scheduler="ddpm", steps=100, tol=0.1, window=25), None,
                                N_OBS_DDPM),
    "pcm_ddim10_step1": (SamplerConfig(name="pcm", scheduler="ddim", steps=10, max_iters=1), "pcm", N_OBS),
    "pcm_lora_ddim10_step1": (SamplerConfig(name="pcm_lora", scheduler="ddim", steps=10, max_iters=1), "pcm_lora",
                              N_OBS),
    "pcm_lora_ddim10": (SamplerConfig(name="pcm_lora", scheduler="ddim", steps=10, tol=0.1), "pcm_lora", N_OBS),
}


def schedule_key(sampler: SamplerConfig) -> str:
    return f"{sampler.scheduler}{sampler.steps}"


def make_inputs(policy) -> dict[str, torch.Tensor]:
    """Observation histories (N_OBS, To, Do) spread over the base's validation/training windows, and seeded noise
    (x_T (n, H, Da), per-step noise (S, n, H, Da)) for each schedule, n = the most observations a case uses."""
    from pcm_policy.observations import dataset_observations as checkpoint_observations

    train_obs, val_obs = checkpoint_observations(BASE)
    pool = torch.cat([val_obs, train_obs])
    obs = pool[torch.linspace(0, len(pool) - 1, N_OBS).round().long()]
    inputs = {"obs": obs.contiguous()}
    rows: dict[str, tuple[SamplerConfig, int]] = {}  # schedule -> (a sampler, most observations a case uses)
    for sampler, _, n in CASES.values():
        rows[schedule_key(sampler)] = (sampler, max(n, rows.get(schedule_key(sampler), (None, 0))[1]))
    for key, (sampler, n) in rows.items():
        x_T, noise = policy.make_noise(n, sampler, torch.Generator().manual_seed(NOISE_SEED))
        inputs[f"{key}.x_T"], inputs[f"{key}.noise"] = x_T.contiguous(), noise.contiguous()
    return inputs


def compute_outputs(policy, pcm_net, inputs: dict[str, torch.Tensor], backend: str = "torch") -> dict[str, torch.Tensor]:
    """Every case's chunk `<case>.action_pred` (N, H, Da) float32, unnormalized (px for PushT), and its
    `<case>.iterations` / `<case>.converged` (int64 scalars), computed from the stored inputs with the denoisers on
    `backend` (the artifact is made with torch; the test recomputes it on every backend)."""
    out = {}
    for name, (sampler, kind, n) in CASES.items():
        key = schedule_key(sampler)
        noise = (inputs[f"{key}.x_T"][:n], inputs[f"{key}.noise"][:, :n])
        chunk_sampler = policy.sampler(sampler, pcm=None if kind is None else pcm_net, backend=backend)
        chunk = policy.predict_chunk(inputs["obs"][:n], sampler=chunk_sampler, noise=noise)
        out[f"{name}.action_pred"] = chunk.action_pred.contiguous()
        out[f"{name}.iterations"] = torch.tensor(int(chunk.stats.iterations))
        out[f"{name}.converged"] = torch.tensor(int(bool(chunk.stats.converged)))
    return out


def load_checkpoints():
    """(base policy, LoRA PCM network) on the CPU, float32."""
    policy, _ = load_policy(BASE, "cpu")
    pcm_net, _ = load_pcm(PCM_LORA_DDIM10, policy, "cpu")
    return policy, pcm_net


def read_golden(path: Path = GOLDEN) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(inputs, outputs, metadata) of a golden file."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    outputs = {k[len("output."):]: v for k, v in tensors.items() if k.startswith("output.")}
    return inputs, outputs, meta


def main() -> None:
    torch.set_num_threads(1)
    policy, pcm_net = load_checkpoints()
    inputs = make_inputs(policy)
    outputs = compute_outputs(policy, pcm_net, inputs)
    tensors = {**{f"input.{k}": v for k, v in inputs.items()}, **{f"output.{k}": v for k, v in outputs.items()}}
    meta = {"command": COMMAND, "base": "data/pusht/base", "pcm": "data/pusht/pcm_lora_ddim10",
            "base_fingerprint": weights_fingerprint(policy.model), "torch": torch.__version__}
    tmp = GOLDEN.with_name(f".{GOLDEN.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN.relative_to(ROOT)} ({GOLDEN.stat().st_size / 1e3:.1f} kB, {len(CASES)} cases)")
    for name in CASES:
        print(f"  {name:26s} iterations {int(outputs[f'{name}.iterations'])}  "
              f"converged {bool(outputs[f'{name}.converged'])}")


if __name__ == "__main__":
    main()
