"""Bad input to `pcm collect`, `pcm bench`, `pcm demo`, and absent devices and datasets: one line on stderr naming
the file or key, exit status 2, no traceback, and no output left behind. One test id per case; the commands run
in this process (`tests/test_cli.py` runs real processes)."""
import shutil

import pytest
import torch

from pcm_policy.checkpoint import latest_checkpoint
from pcm_policy.data.info import dataset_info
from tests.fixtures import assert_refused, pusht_arrays, run_cli, write_pusht_zarr

BENCH = ["device=cpu", "chunks=1", "warmup=0", "schedules=[ddim2]", "early_stop=false", "output_dir={out}"]
DEMO = ["device=cpu", "output_dir={out}"]
REFUSED = [
    # collect
    pytest.param(["collect", "task=nope", "output_dir={out}"], ["task/nope"], id="collect task=nope"),
    pytest.param(["collect", "episodes=-3", "output_dir={out}"], ["episodes=-3"], id="collect episodes=-3"),
    pytest.param(["collect", "episodes=many", "output_dir={out}"], ["episodes"], id="collect episodes=many"),
    pytest.param(["collect", "episodez=3", "output_dir={out}"], ["episodez"], id="collect episodez=3"),
    pytest.param(["collect", "episodes=1", "output_dir={file}/sub"], ["a_file"], id="collect output_dir under a file"),
    # bench
    pytest.param(["bench", "checkpoint={nothing}", *BENCH], ["nothing"], id="bench checkpoint missing"),
    pytest.param(["bench", "checkpoint={base}", "task=lift", *BENCH], ["task", "lift"], id="bench task=lift"),
    pytest.param(["bench", "checkpoint={corrupt}", *BENCH], ["policy.safetensors"], id="bench corrupt weights"),
    pytest.param(["bench", "checkpoint={other_base}", "+pcm.ddpm8={pcm_ddpm8}", *BENCH[:-2], "schedules=[ddpm8]",
                  "output_dir={out}"], ["pcm", "another base"], id="bench PCM of another base"),
    pytest.param(["bench", "checkpoint={base}", *BENCH[1:], "device=cuda"], ["device"], id="bench device=cuda"),
    pytest.param(["bench", "checkpoint={base}", *BENCH, "chunks=0"], ["chunks"], id="bench chunks=0"),
    # demo
    pytest.param(["demo", "checkpoint={nothing}", *DEMO], ["nothing"], id="demo checkpoint missing"),
    pytest.param(["demo", "checkpoint={base}", "episodez=2", *DEMO], ["episodez"], id="demo episodez=2"),
    pytest.param(["demo", "checkpoint={base}", "episodes=two", *DEMO], ["episodes"], id="demo episodes=two"),
    pytest.param(["demo", "checkpoint={base}", "sampler=nope", *DEMO], ["sampler/nope"], id="demo sampler=nope"),
    pytest.param(["demo", "checkpoint={base}", "task=lift", *DEMO], ["task", "lift"], id="demo task=lift"),
    pytest.param(["demo", "checkpoint={other_base}", "sampler.steps=8", "+pcm_lora.ddim8={pcm}", *DEMO],
                 ["pcm", "another base"], id="demo PCM of another base"),
    pytest.param(["demo", "checkpoint={base}", "pcm_lora.ddim10={pcm}", *DEMO],
                 ["pcm_lora.ddim10", "trained for ddim8", "ddim10"], id="demo PCM for another schedule"),
    pytest.param(["demo", "checkpoint={base}", "device=cuda", "output_dir={out}"], ["device"], id="demo device=cuda"),
]


@pytest.fixture
def paths(tiny_runs, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(latest_checkpoint(tiny_runs / "base"), corrupt)
    (corrupt / "policy.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "a_file").write_text("not a directory")
    return {"base": tiny_runs / "base", "other_base": tiny_runs / "other_base", "pcm": tiny_runs / "pcm",
            "pcm_ddpm8": tiny_runs / "pcm_ddpm8", "corrupt": corrupt, "nothing": tmp_path / "nothing",
            "file": tmp_path / "a_file", "out": tmp_path / "out"}


@pytest.mark.parametrize("args,needles", REFUSED)
def test_refused_and_nothing_written(paths, tmp_path, capsys, args, needles):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_refused(capsys, tmp_path, *[a.format(**paths) for a in args], needles=needles)
    assert paths["file"].read_text() == "not a directory"


@pytest.mark.parametrize("command,args", [("train", ["dataset.path={data}"]),
                                          ("eval", ["checkpoint={base}", "episodes=1", "videos=0"]),
                                          ("train-pcm", ["base={base}"]), ("bench", ["checkpoint={base}"]),
                                          ("demo", ["checkpoint={base}"])])
def test_absent_cuda_is_one_line(tiny_runs, tmp_path, capsys, command, args):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    paths = {"base": tiny_runs / "base", "data": tiny_runs / "d.zarr"}
    assert_refused(capsys, tmp_path, command, *[a.format(**paths) for a in args], "device=cuda",
                   f"output_dir={tmp_path / 'o'}", needles=["device='cuda'", "CUDA"])


def test_collect_refuses_an_existing_corrupt_or_different_dataset(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "pusht_expert.zarr").write_bytes(b"\x00garbage" * 10)
    assert_refused(capsys, tmp_path, "collect", "episodes=1", f"output_dir={junk}",
                   needles=["pusht_expert.zarr", "overwrite"])

    broken = tmp_path / "broken"  # a zarr directory whose episode_ends run past the data
    arrays = pusht_arrays()
    arrays["episode_ends"][-1] = 400
    write_pusht_zarr(broken / "pusht_expert.zarr", arrays=arrays)
    assert_refused(capsys, tmp_path, "collect", "episodes=4", f"output_dir={broken}",
                   needles=["pusht_expert.zarr", "episode_ends"])

    other = tmp_path / "other"  # a good dataset with another number of episodes
    write_pusht_zarr(other / "pusht_expert.zarr")
    assert_refused(capsys, tmp_path, "collect", "episodes=2", f"output_dir={other}",
                   needles=["pusht_expert.zarr", "4 episodes"])

    # overwrite=true replaces the junk file by a dataset (a directory over a file), leaving nothing else behind
    code, err = run_cli(capsys, "collect", "episodes=1", "keep_failed=true", "task.max_steps=10", "overwrite=true",
                        f"output_dir={junk}")
    assert code == 0, err
    assert dataset_info(junk / "pusht_expert.zarr")["episodes"] == 1
    assert sorted(p.name for p in junk.iterdir()) == ["metrics.json", "pusht_expert.zarr"]


def test_missing_expert_dataset_says_how_to_regenerate_it(tmp_path, capsys):
    """PickPlaceCan's demonstrations ship as their command only: a missing one names the file and the command."""
    missing = tmp_path / "can" / "can_expert.hdf5"
    assert_refused(capsys, tmp_path, "train", "task=can", f"dataset.path={missing}", f"output_dir={tmp_path / 'run'}",
                   "train.steps=1", needles=[str(missing), "no such file",
                                             f"pcm collect task=can episodes=200 seed=0 output_dir={missing.parent}",
                                             "data/can/README.md"])
    assert_refused(capsys, tmp_path, "data", "info", tmp_path / "pusht_expert.zarr",
                   needles=["no such file", "pcm collect task=pusht episodes=500 seed=0"])


@pytest.mark.parametrize("command,extra", [("bench", ["chunks=2", "schedules=[ddim10]"]),
                                           ("demo", ["episodes=1", "chunks=2", "schedules=[ddim10]"]),
                                           ("train-pcm", ["steps=8", "lora_rank=2"])])
def test_a_base_whose_dataset_is_missing_is_refused_before_work(tiny_runs, tmp_path, capsys, command, extra):
    """bench, demo and train-pcm draw observations from the base's dataset: a missing one is refused first."""
    base = tmp_path / "base"
    shutil.copytree(tiny_runs / "base", base)
    for run_config in base.rglob("config.yaml"):  # the dataset the checkpoint was trained on, moved away
        run_config.write_text(run_config.read_text().replace(str(tiny_runs / "d.zarr"),
                                                              str(tmp_path / "gone" / "pusht_expert.zarr")))
    key = "base" if command == "train-pcm" else "checkpoint"
    assert_refused(capsys, tmp_path, command, f"{key}={base}", f"output_dir={tmp_path / 'out'}", "threads=1", *extra,
                   needles=["pusht_expert.zarr: no such file", "pcm collect task=pusht"])
