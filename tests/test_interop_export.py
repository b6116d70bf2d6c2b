"""`pcm export --format lerobot|diffusion-policy`: a base policy in the other tool's layout, read back by our
importers as the same policy (weights and normalizer bit for bit, the same chunks), in the layout the tools'
own files have (compared with the fixtures they wrote, tests/data/interop)."""
import json
from pathlib import Path

import pytest
import torch

from fixtures import assert_refused, run_cli
from pcm_policy import checkpoint as ckpt_io
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.interop import import_diffusion_policy, import_lerobot, write_imported_checkpoint
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.export_marker import MARKER_FILE
from pcm_policy.interop.lerobot_export import export_lerobot
from pcm_policy.interop.safe_pickle import load_restricted
from pcm_policy.sampler_config import SamplerConfig

FIXTURES = Path(__file__).parent / "data" / "interop"
SHIPPED_BASE = Path(__file__).parents[1] / "data" / "pusht" / "base"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Checkpoints imported from the fixtures the source tools wrote: {name: checkpoint dir}."""
    root = tmp_path_factory.mktemp("imported")
    sources = {"lerobot": import_lerobot(FIXTURES / "lerobot_pusht_keypoints"),
               "lerobot_variant": import_lerobot(FIXTURES / "lerobot_pusht_keypoints_variant"),
               "dp": import_diffusion_policy(FIXTURES / "dp_lowdim_pusht.ckpt"),
               "dp_noscale": import_diffusion_policy(FIXTURES / "dp_lowdim_pusht_noscale_ddim.ckpt")}
    return {name: write_imported_checkpoint(p, root / name) for name, p in sources.items()}


def _chunks(policy, obs_dim):
    obs = torch.rand(3, policy.config.n_obs_steps, obs_dim, generator=torch.Generator().manual_seed(0)) * 400 + 50
    out = []
    for scheduler, steps in (("ddim", 10), ("ddpm", 100)):
        sampler = SamplerConfig(name="sequential", scheduler=scheduler, steps=steps)
        noise = policy.make_noise(3, sampler, torch.Generator().manual_seed(1))
        out.append(policy.predict_chunk(obs, sampler, noise=noise).action_pred)
    return out


def _assert_same_policy(a, b, stats=("scale", "offset", "min", "max", "mean", "std")):
    wa, wb = a.weights(), b.weights()
    network = sorted(k for k in wa if k.startswith("model."))
    assert network == sorted(k for k in wb if k.startswith("model."))
    for key in network:
        assert torch.equal(wa[key], wb[key]), key
    for key in (k for k in wa if k.startswith("normalizer.") and k.rsplit(".", 1)[1] in stats):
        assert torch.equal(wa[key], wb[key]), key
    for x, y in zip(_chunks(a, a.config.obs_dim), _chunks(b, b.config.obs_dim)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["lerobot", "lerobot_variant", "dp", "dp_noscale"])
def test_diffusion_policy_round_trip_is_bit_for_bit(imported, name, tmp_path):
    original, _ = ckpt_io.load_policy(imported[name])
    back = import_diffusion_policy(export_diffusion_policy(imported[name], tmp_path / "p.ckpt")).build_policy()
    _assert_same_policy(original, back)
    assert original.config.film_scale == back.config.film_scale


def test_shipped_base_round_trips_through_both_formats(tmp_path):
    original, card = ckpt_io.load_policy(SHIPPED_BASE)
    dp = import_diffusion_policy(export_diffusion_policy(SHIPPED_BASE, tmp_path / "base.ckpt"))
    _assert_same_policy(original, dp.build_policy())
    assert dp.card["task"] == card["task"] and dp.card["observation"]["kind"] == "dp_pusht_lowdim"
    report = export_lerobot(SHIPPED_BASE, tmp_path / "lerobot")
    # lerobot's split: the agent position is the robot state, the 9 keypoints the environment state
    assert report["inexact_dims"] == 0 and report["features"] == {"observation.state": 2,
                                                                  "observation.environment_state": 18}
    assert report["obs_order"] == [18, 19, *range(18)]
    # lerobot keeps min/max (not mean/std); its MIN_MAX map from them is ours bit for bit, and the import puts the
    # observation back in the policy's own order (weights and statistics permuted back)
    back = import_lerobot(tmp_path / "lerobot")
    _assert_same_policy(original, back.build_policy(), ("scale", "offset", "min", "max"))
    assert back.card["task"] == "pusht" and back.card["env_id"] == "pcm/PushT-v0"
    assert back.card["observation"] == {"kind": "dp_pusht_lowdim", "layout": [{"name": "keypoints", "size": 18},
                                                                               {"name": "agent_pos", "size": 2}]}


@pytest.mark.parametrize("name", ["lerobot", "lerobot_variant"])
def test_lerobot_round_trip_keeps_the_map_bit_for_bit(imported, name, tmp_path):
    original, _ = ckpt_io.load_policy(imported[name])
    report = export_lerobot(imported[name], tmp_path / "out")
    assert report["inexact_dims"] == 0
    assert report["features"] == {"observation.state": 2, "observation.environment_state": 16}
    back = import_lerobot(tmp_path / "out")
    assert back.card["observation"]["kind"] == "lerobot_pusht_keypoints" and back.card["task"] == "pusht"
    # the variant was MEAN_STD: exported as MIN_MAX, its min/max are the map's pre-image, not the data's
    _assert_same_policy(original, back.build_policy(), ("scale", "offset") if name.endswith("variant") else
                        ("scale", "offset", "min", "max"))


def test_lerobot_export_has_lerobots_own_layout(imported, tmp_path):
    export_lerobot(imported["lerobot"], tmp_path / "out")
    ours, theirs = tmp_path / "out", FIXTURES / "lerobot_pusht_keypoints"
    # lerobot's files, and pcm's export mark beside them
    assert sorted(p.name for p in ours.iterdir()) == sorted([p.name for p in theirs.iterdir()] + [MARKER_FILE])
    cfg, ref = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert set(cfg) <= set(ref)  # lerobot's config parser knows every key written
    assert {k: cfg[k] for k in cfg if k != "device"} == {k: ref[k] for k in cfg if k != "device"}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        a, b = (json.loads((d / name).read_text()) for d in (ours, theirs))
        assert [s["registry_name"] for s in a["steps"]] == [s["registry_name"] for s in b["steps"]]
        assert [s.get("state_file") for s in a["steps"]] == [s.get("state_file") for s in b["steps"]]
    for name in (p.name for p in theirs.glob("*.safetensors")):
        a, b = (ckpt_io.read_weights(d / name) for d in (ours, theirs))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, name


def test_diffusion_policy_export_has_dps_own_layout(imported, tmp_path):
    ours = load_restricted(export_diffusion_policy(imported["dp"], tmp_path / "p.ckpt"))
    theirs = load_restricted(FIXTURES / "dp_lowdim_pusht.ckpt")
    for which in ("model", "ema_model"):
        a, b = ours["state_dicts"][which], theirs["state_dicts"][which]
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    a, b = ours["cfg"].policy, theirs["cfg"].policy
    assert set(a) == set(b) and set(a.model) == set(b.model)
    assert {k: a[k] for k in a if k not in ("model", "noise_scheduler")} == \
           {k: b[k] for k in b if k not in ("model", "noise_scheduler")}
    assert dict(a.model) == dict(b.model) and dict(a.noise_scheduler) == dict(b.noise_scheduler)
    assert ours["cfg"].task.name == "pusht_lowdim" and "pickles" in ours


def test_exports_refuse_what_the_formats_cannot_hold(tiny_runs, tmp_path):
    with pytest.raises(CheckpointError, match="only base policies export"):
        export_lerobot(tiny_runs / "pcm", tmp_path / "x")
    with pytest.raises(ConfigError, match="final_n_groups=4"):  # the tiny policies use GroupNorm 4 throughout
        export_diffusion_policy(tiny_runs / "base", tmp_path / "x.ckpt")
    assert not any(tmp_path.iterdir())


def test_export_command_formats(imported, capsys, tmp_path):
    base = imported["dp"]
    code, err = run_cli(capsys, "export", base, tmp_path / "dp.ckpt", "--format", "diffusion-policy")
    assert code == 0, err
    assert import_diffusion_policy(tmp_path / "dp.ckpt").card["source"]["format"] == "diffusion_policy"
    assert run_cli(capsys, "export", base, tmp_path / "lr", "--format", "lerobot")[0] == 0
    assert (tmp_path / "lr" / "config.json").is_file()
    # over its own earlier export: allowed; over other data, the source, or with fp16: refused, nothing written
    assert run_cli(capsys, "export", base, tmp_path / "lr", "--format", "lerobot")[0] == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert_refused(capsys, tmp_path, "export", base, tmp_path / "notes", "--format", "lerobot",
                   needles=["not an earlier pcm export"])
    assert_refused(capsys, tmp_path, "export", base, tmp_path / "notes" / "a.txt", "--format", "diffusion-policy",
                   needles=["not an earlier pcm export"])
    assert_refused(capsys, tmp_path, "export", base, base / "x.ckpt", "--format", "diffusion-policy",
                   needles=["would overwrite the checkpoint being exported"])
    assert_refused(capsys, tmp_path, "export", base, tmp_path / "h.ckpt", "--format", "diffusion-policy", "--dtype",
                   "float16", needles=["--dtype float16", "float32"])
