"""A policy exported as ONNX graphs plus `policy.json` (`pcm export --format onnx`), and the loader of such a directory.

Directory:
    denoiser.onnx   the base network (`onnx_graph`): sample (N, H, Da) f32, timestep (N,) i64, global_cond (N, C) f32
                    -> model_output (N, H, Da)
    encoder.onnx    image policies: images (N, To, cameras, 3, H, W) uint8 -> features (N, To, cameras * F)
                    (`onnx_encoder`)
    pcm_lora.onnx   a LoRA PCM (given with `pcm=DIR`): the denoiser's inputs plus `scale` (1,) f32 (0: the base
                    network, 1: the PCM)
    pcm.onnx        a full-copy PCM: the denoiser's interface
    policy.json     everything needed to sample with onnxruntime and diffusers alone: shapes, the training
                    DDPMScheduler kwargs, the normalizer (normalized = x * scale + offset), how the global condition
                    is laid out, the observation layout and cameras, and the graphs with their SHA-256 checksums

The export checks itself before writing: every graph run by onnxruntime against the torch network on random
inputs at N = 1 and N = 10; off by more than `SELF_CHECK_ATOL` anywhere, nothing is written. The directory is
written atomically (`pcm_policy.atomic`). `load_exported` refuses a directory whose graphs do not match their
checksums.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pcm_policy.atomic import atomic_path
from pcm_policy.backends.denoisers import NetworkShape
from pcm_policy.backends.onnx_encoder import encoder_graph
from pcm_policy.backends.onnx_graph import OUTPUT, SCALE_INPUT, denoiser_graph
from pcm_policy.backends.onnx_session import make_session
from pcm_policy.backends.torch_denoisers import is_lora_network
from pcm_policy.errors import CheckpointError, PcmError
from pcm_policy.model.lora import scaled_denoiser
from pcm_policy.tasks import TASKS

POLICY_JSON = "policy.json"
FORMAT = "pcm-policy-onnx"
FORMAT_VERSION = 1
SELF_CHECK_ATOL = 1e-4  # max |onnxruntime - torch| on the self-check's random inputs
SELF_CHECK_ROWS = (1, 10)


@dataclass
class Graph:
    """One graph of the export: its file name, bytes, and how to check it against torch.

    Attributes:
        file: e.g. `denoiser.onnx`.
        model: the serialized graph.
        feeds: `feeds(rows)` -> (onnxruntime input dict, the torch output for the same inputs as numpy).
        interface: inputs and outputs as written in policy.json.
    """

    file: str
    model: bytes
    feeds: Callable[[int], tuple[dict[str, np.ndarray], np.ndarray]]
    interface: dict[str, Any]


def _denoiser_interface(shape: NetworkShape, scale: bool) -> dict[str, Any]:
    H, Da = shape.sample_shape
    inputs = {"sample": ["N", H, Da, "float32"], "timestep": ["N", "int64"], "global_cond": ["N", shape.cond_dim, "float32"]}
    if scale:
        inputs[SCALE_INPUT] = [1, "float32"]
    return {"inputs": inputs, "outputs": {OUTPUT: ["N", H, Da, "float32"]}}


def _denoiser(file: str, net: torch.nn.Module, shape: NetworkShape, scale_input: bool) -> Graph:
    """A denoiser graph; the LoRA one is checked at scale 1 (N=1) and 0.5 (other N)."""
    H, T = shape.sample_shape[0], shape.num_train_timesteps
    model = denoiser_graph(net, H, T, scale=None if scale_input else 1.0)
    torch_fn = scaled_denoiser(net) if scale_input else net

    @torch.no_grad()
    def feeds(rows: int):
        scale = (1.0 if rows == 1 else 0.5,) if scale_input else ()
        x, t, cond, *extra = shape.example(rows, scale)
        inputs = {"sample": x.numpy(), "timestep": t.numpy(), "global_cond": cond.numpy()}
        if scale_input:
            inputs[SCALE_INPUT] = np.array([scale[0]], np.float32)
        return inputs, torch_fn(x, t, cond, *extra).numpy()

    return Graph(file, model, feeds, _denoiser_interface(shape, scale_input))


def _encoder(policy) -> Graph:
    encoder, config = policy.encoder, policy.config
    cameras, (h, w) = len(config.camera_keys), encoder.config.image_shape
    model = encoder_graph(encoder, config.n_obs_steps, cameras)

    @torch.no_grad()
    def feeds(rows: int):
        generator = torch.Generator().manual_seed(rows)
        images = torch.randint(0, 256, (rows, config.n_obs_steps, cameras, 3, h, w), generator=generator,
                               dtype=torch.uint8)
        was_training = encoder.training
        try:
            expected = encoder.eval().encode_steps(images).numpy()
        finally:
            encoder.train(was_training)
        return {"images": images.numpy()}, expected

    interface = {"inputs": {"images": ["N", config.n_obs_steps, cameras, 3, h, w, "uint8"]},
                 "outputs": {"features": ["N", config.n_obs_steps, cameras * encoder.feature_dim, "float32"]}}
    return Graph("encoder.onnx", model, feeds, interface)


def network_shape(policy) -> NetworkShape:
    """The backends' view of a policy's network (sample shape, condition size, T)."""
    c = policy.config
    return NetworkShape((c.horizon, c.action_dim), c.step_cond_dim * c.n_obs_steps, c.num_train_timesteps)


def build_graphs(policy, pcm: torch.nn.Module | None = None) -> list[Graph]:
    """Every graph of an export: the denoiser, the encoder of an image policy, and the PCM's graph.

    Raises:
        ConfigError: onnx does not import.
        PcmError: a network the graph writer does not support.
    """
    shape = network_shape(policy)
    graphs = [_denoiser("denoiser.onnx", policy.model, shape, scale_input=False)]
    if policy.encoder is not None:
        graphs.append(_encoder(policy))
    if pcm is not None:
        lora = is_lora_network(pcm)
        graphs.append(_denoiser("pcm_lora.onnx" if lora else "pcm.onnx", pcm, shape, scale_input=lora))
    return graphs


def self_check(graphs: list[Graph], rows: tuple[int, ...] = SELF_CHECK_ROWS) -> dict[str, float]:
    """Run every graph with onnxruntime against torch on random inputs of each row count.

    Returns:
        file -> the largest |onnxruntime - torch| over its checks.

    Raises:
        PcmError: one line naming the graph, the row count and the largest difference, when it exceeds
            `SELF_CHECK_ATOL` (nothing has been written then).
    """
    worst: dict[str, float] = {}
    largest = (0.0, "", 0)
    for graph in graphs:
        session = make_session(graph.model, threads=1)
        for n in rows:
            inputs, expected = graph.feeds(n)
            got = session.run(None, inputs)[0]
            diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.shape == expected.shape else np.inf
            worst[graph.file] = max(worst.get(graph.file, 0.0), diff)
            if not diff <= largest[0]:
                largest = (diff, graph.file, n)
    if not largest[0] <= SELF_CHECK_ATOL:
        diff, file, n = largest
        raise PcmError(f"onnx export self-check failed: {file} differs from torch by {diff:.2e} at N={n} "
                       f"(limit {SELF_CHECK_ATOL:g}); nothing written")
    return worst


def _observation(policy, card: Mapping[str, Any]) -> dict[str, Any]:
    """The observation a policy takes: its layout's kind and parts, the env, and the cameras."""
    observation = card.get("observation") or {}
    kind, parts, env_id = observation.get("kind"), observation.get("layout"), card.get("env_id")
    task = TASKS.get(card.get("task"))
    if task is not None:
        layout = task.layout(kind)
        kind, env_id = layout.kind, layout.env_id
        parts = [{"name": name, "size": size} for name, size in layout.parts]
    out = {"kind": kind, "parts": parts, "env_id": env_id, "history": policy.config.n_obs_steps,
           "cameras": list(policy.config.camera_keys)}
    if policy.encoder is not None:
        out["image_shape"] = list(policy.encoder.config.image_shape)
        out["image"] = "(cameras, 3, H, W) uint8 0..255 per step, channel-first"
    return out


def policy_json(policy, card: Mapping[str, Any], graphs: list[Graph], checks: Mapping[str, float],
                source: str, pcm_card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of `policy.json` (see the module docstring)."""
    c = policy.config
    normalizer = {name: {"scale": policy.normalizer.params[name]["scale"].tolist(),
                         "offset": policy.normalizer.params[name]["offset"].tolist()} for name in ("obs", "action")}
    spec = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "exported_from": source, "task": card.get("task"),
        "horizon": c.horizon, "n_obs_steps": c.n_obs_steps, "n_action_steps": c.n_action_steps,
        "obs_dim": c.obs_dim, "action_dim": c.action_dim, "executed_actions": [c.n_obs_steps - 1,
                                                                                c.n_obs_steps - 1 + c.n_action_steps],
        "noise_scheduler": dict(c.noise_scheduler), "normalizer": normalizer,
        "global_cond": {"dim": c.step_cond_dim * c.n_obs_steps, "per_step": c.step_cond_dim,
                        "layout": "per observation step: the normalized obs (obs_dim), then each camera's features "
                                  "(encoder.onnx); flattened over the n_obs_steps steps, oldest first"},
        "observation": _observation(policy, card),
        "graphs": {g.file: {**g.interface, "sha256": hashlib.sha256(g.model).hexdigest(),
                            "self_check_max_abs_diff": checks[g.file]} for g in graphs},
    }
    if pcm_card is not None:
        spec["pcm"] = {k: pcm_card.get(k) for k in ("mode", "scheduler", "steps", "start", "lora_rank")}
    return spec


def write_export(out: Path, graphs: list[Graph], spec: Mapping[str, Any]) -> Path:
    """Write the graphs and `policy.json` into `out` atomically (a new directory swapped in whole)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for graph in graphs:
            (tmp / graph.file).write_bytes(graph.model)
        (tmp / POLICY_JSON).write_text(json.dumps(spec, indent=2) + "\n")
    return out


def export_onnx(policy, out: Path, card: Mapping[str, Any], source: str, pcm: torch.nn.Module | None = None,
                pcm_card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export a loaded policy (and its PCM) as ONNX graphs + policy.json into `out`, after the self-check.

    Args:
        policy: the `DiffusionPolicy` (CPU, float32).
        out: the output directory (replaced whole, atomically).
        card: the checkpoint's card (task, observation layout).
        source: the checkpoint, as recorded in policy.json.
        pcm: a PCM network for this base (`pcm_policy.pcm.attach.load_pcm`), or None.
        pcm_card: the PCM's card (its schedule and mode, recorded in policy.json).

    Returns:
        The policy.json content.

    Raises:
        PcmError: the self-check failed (one line naming the largest difference; nothing written), or a network
            the graph writer does not support.
        ConfigError: onnx or onnxruntime does not import.
    """
    graphs = build_graphs(policy, pcm)
    checks = self_check(graphs)
    spec = policy_json(policy, card, graphs, checks, source, pcm_card)
    write_export(out, graphs, spec)
    return spec


@dataclass
class ExportedPolicy:
    """A loaded export directory: `spec` (policy.json) and `graphs` (file -> bytes, checksums verified)."""

    path: Path
    spec: dict[str, Any]
    graphs: dict[str, bytes]

    def session(self, file: str, threads: int | None = 1):
        """An onnxruntime session of one of its graphs (e.g. `denoiser.onnx`).

        Raises:
            CheckpointError: the export has no such graph.
        """
        if file not in self.graphs:
            raise CheckpointError(f"{self.path}: no {file} in this export (it has {', '.join(sorted(self.graphs))})")
        return make_session(self.graphs[file], threads)


def load_exported(path: str | Path) -> ExportedPolicy:
    """Read an export directory, refusing one whose graphs do not match the checksums in its policy.json.

    Raises:
        CheckpointError: one line: no directory or policy.json, unreadable JSON, not this format, a graph missing,
            or a graph whose SHA-256 differs from policy.json's.
    """
    path = Path(path)
    spec_path = path / POLICY_JSON
    if not spec_path.is_file():
        raise CheckpointError(f"{path}: not an ONNX export (no {POLICY_JSON})")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{spec_path}: unreadable ({type(e).__name__})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("graphs"), dict):
        raise CheckpointError(f"{spec_path}: not a {FORMAT} policy.json")
    graphs = {}
    for file, entry in spec["graphs"].items():
        graph_path = path / file
        if Path(file).name != file or not graph_path.is_file():
            raise CheckpointError(f"{graph_path}: missing (listed in {POLICY_JSON})")
        data = graph_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != (entry or {}).get("sha256"):
            raise CheckpointError(f"{graph_path}: does not match its SHA-256 checksum in {POLICY_JSON} (modified or "
                                  "corrupt); export the policy again")
        graphs[file] = data
    return ExportedPolicy(path, spec, graphs)
