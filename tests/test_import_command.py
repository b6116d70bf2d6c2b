"""`pcm import`: another tool's policy becomes an ordinary checkpoint every command takes - eval in the env that
gives its observation, train-pcm and bench with closed-loop observations or the dataset recorded at import - and
bad requests are refused in one line before anything is written."""
from pathlib import Path

import pytest
import torch

from pcm_policy.checkpoint import load_policy, read_card, read_run_config
from pcm_policy.commands import build_config, run_command
from tests.fixtures import assert_refused, write_pusht_zarr

INTEROP = Path(__file__).resolve().parent / "data" / "interop"
LEROBOT = INTEROP / "lerobot_pusht_keypoints"
DP = INTEROP / "dp_lowdim_pusht.ckpt"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The lerobot PushT-keypoints fixture and the DP low-dim PushT fixture, imported (the DP one with a dataset)."""
    root = tmp_path_factory.mktemp("imported")
    data = write_pusht_zarr(root / "d.zarr", lengths=[30, 40, 25, 35, 28])
    from pcm_policy.cli import main

    assert main(["import", "lerobot", str(LEROBOT), f"output_dir={root / 'lerobot'}"]) == 0
    assert main(["import", "diffusion-policy", str(DP), f"output_dir={root / 'dp'}", f"dataset.path={data}"]) == 0
    return root


def test_import_writes_an_ordinary_checkpoint(imported):
    lr, dp = read_card(imported / "lerobot"), read_card(imported / "dp")
    assert (lr["task"], lr["observation"]["kind"], lr["source"]["format"]) == ("pusht", "lerobot_pusht_keypoints",
                                                                                 "lerobot")
    assert (dp["task"], dp["observation"]["kind"]) == ("pusht", "dp_pusht_lowdim")
    assert read_run_config(imported / "dp")["dataset"]["kind"] == "pusht_zarr"  # recorded: bench can draw from it
    policy, _ = load_policy(imported / "lerobot")
    assert policy.config.obs_dim == 18


def test_eval_runs_the_imported_policy_in_the_env_giving_its_observation(imported, tmp_path):
    config = build_config("eval", [f"checkpoint={imported / 'lerobot'}", "device=cpu", f"output_dir={tmp_path}"])
    assert config.task.env_id == "pcm/PushT-envstate-v0"  # agent position + gym-pusht's 8 block corners
    assert build_config("eval", [f"checkpoint={imported / 'dp'}", "device=cpu",
                                 f"output_dir={tmp_path}"]).task.env_id == "pcm/PushT-v0"


@pytest.mark.sim
def test_closed_loop_with_an_imported_policy_and_its_pcm(imported, tmp_path):
    """train-pcm on rollouts of the imported policy, then eval with its PCM and bench with rollout observations."""
    pcm = tmp_path / "pcm"
    run_command("train-pcm", [f"base={imported / 'lerobot'}", "observations=closed_loop", "closed_loop.episodes=1",
                              "closed_loop.eval_episodes=1", "closed_loop.max_steps=16", "closed_loop.n_envs=1",
                              "scheduler=ddim", "steps=4", "trajectories=4", "collect_batch=4", "epochs=1",
                              "batch_size=4", "eval_observations=1", "lora_rank=2", "device=cpu",
                              f"output_dir={pcm}"])
    metrics = run_command("eval", [f"checkpoint={imported / 'lerobot'}", "sampler=pcm_lora", "sampler.scheduler=ddim",
                                   "sampler.steps=4", f"sampler.pcm_checkpoint={pcm}", "episodes=1", "n_envs=1",
                                   "videos=0", "task.max_steps=16", "device=cpu", f"output_dir={tmp_path / 'eval'}"])
    assert metrics["episodes"] == 1 and metrics["sampler"] == "pcm_lora/ddim4"
    report = run_command("bench", [f"checkpoint={imported / 'lerobot'}", "observations=closed_loop", "pcm=null",
                                   "pcm_lora.ddpm100=null", "pcm_lora.ddim10=null", f"+pcm_lora.ddim4={pcm}",
                                   "schedules=[ddim4]", "chunks=2", "warmup=0",
                                   "early_stop=false", "task.max_steps=16", "device=cpu",
                                   f"output_dir={tmp_path / 'bench'}"])
    assert {r["sampler"] for r in report["rows"]} >= {"sequential", "picard", "pcm_lora"}


def test_the_imported_chunks_equal_the_source_s(imported):
    """(The importers' own tests cover every fixture; here: through the written checkpoint.)"""
    from safetensors.torch import load_file

    expected = load_file(str(INTEROP / "expected_lerobot_pusht_keypoints_ddim10.safetensors"))
    policy, _ = load_policy(imported / "lerobot")
    out = policy.predict_chunk(expected["obs"], {"name": "sequential", "scheduler": "ddim", "steps": 10},
                               noise=(expected["x_T"], expected["z"]))
    torch.testing.assert_close(out.action, expected["action"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("args,needles", [
    pytest.param(["import", "lerobot", "{nothing}", "output_dir={out}"], ["nothing", "not found"], id="missing source"),
    pytest.param(["import", "lerobot", str(LEROBOT), "output_dir={file}"], ["output_dir", "not a directory"],
                 id="output is a file"),
    pytest.param(["import", "lerobot", str(LEROBOT), "output_dir={full}"], ["output_dir", "not a checkpoint"],
                 id="output is another folder"),
    pytest.param(["import", "lerobot", str(LEROBOT), "output_dir={out}", "dataset.path={nothing}"],
                 ["nothing", "no such file"], id="missing dataset"),
    pytest.param(["import", "lerobot", str(LEROBOT), "output_dir={out}", "dataset.path={data}"],
                 ["dataset.path", "lerobot_pusht_keypoints", "closed_loop"], id="dataset in another layout"),
    pytest.param(["import", "diffusion-policy", str(LEROBOT / "config.json"), "output_dir={out}"],
                 ["config.json"], id="not a DP checkpoint"),
    pytest.param(["import", "lerobot", str(LEROBOT), "output_dir={out}", "seed=-1"], ["seed=-1"], id="seed=-1"),
])
def test_bad_requests_are_refused_and_nothing_written(tmp_path, capsys, args, needles):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    data = write_pusht_zarr(tmp_path / "d.zarr")
    paths = {"nothing": tmp_path / "nothing", "out": tmp_path / "out", "file": tmp_path / "a_file",
             "full": tmp_path / "full", "data": data}
    assert_refused(capsys, tmp_path, *[a.format(**paths) for a in args], needles=needles)


def test_commands_that_need_a_dataset_name_the_other_sources(imported, tmp_path, capsys):
    assert_refused(capsys, tmp_path, "bench", f"checkpoint={imported / 'lerobot'}", "pcm=null", "pcm_lora=null",
                   f"output_dir={tmp_path / 'b'}", needles=["records no dataset", "observations=closed_loop"])
    assert_refused(capsys, tmp_path, "train-pcm", f"base={imported / 'lerobot'}", f"output_dir={tmp_path / 'p'}",
                   needles=["records no dataset", "observations=closed_loop", "dataset.path"])


@pytest.mark.parametrize("edit,needles", [
    pytest.param(lambda card: card["observation"]["layout"].reverse(), ["observation parts", "another order"],
                 id="parts in another order"),
    pytest.param(lambda card: card.update(abs_action=True), ["absolute-action"], id="absolute actions"),
    pytest.param(lambda card: card.update(task=None, observation={"kind": "lerobot_state", "layout": [
        {"name": "observation.state", "size": 7}]}), ["lerobot_state", "observation.state 7", "no env"],
        id="an observation no env gives"),
])
def test_eval_refuses_a_policy_no_env_here_can_run(imported, tmp_path, capsys, edit, needles):
    import shutil

    import yaml

    ckpt = tmp_path / "ckpt"
    shutil.copytree(imported / "dp", ckpt)
    card = yaml.safe_load((ckpt / "policy.yaml").read_text())
    edit(card)
    (ckpt / "policy.yaml").write_text(yaml.safe_dump(card))
    assert_refused(capsys, tmp_path, "eval", f"checkpoint={ckpt}", "device=cpu", f"output_dir={tmp_path / 'e'}",
                   needles=needles)
