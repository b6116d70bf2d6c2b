"""Bad input to `pcm collect`, `pcm bench`, `pcm demo` and absent devices: one line on stderr naming the file or
key, exit status 2, no traceback, and no output left behind (real processes, as a user would run them)."""
import shutil
from pathlib import Path

import pytest

from pcm_policy.config import compose
from tests.fixtures import write_pusht_zarr
from tests.test_cli import pcm

TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]


def assert_user_error(result, *needles):
    """Exit status 2 (a PcmError), exactly one non-empty stderr line containing every needle, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("pcm: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def assert_nothing_written(directory):
    directory = Path(directory)
    assert not directory.exists() or not any(directory.iterdir()), sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny PushT bases (different seeds) and a LoRA PCM trained for the first one."""
    from pcm_policy.pcm.training import train_pcm
    from pcm_policy.training import train

    root = tmp_path_factory.mktemp("bad_input")
    data = write_pusht_zarr(root / "d.zarr", lengths=[30, 40, 25, 35, 28])
    for name, seed in (("base", 0), ("other_base", 1)):
        train(compose("train", [f"dataset.path={data}", f"output_dir={root / name}", "device=cpu", "train.steps=2",
                                "train.batch_size=16", "train.checkpoint_every=2", f"seed={seed}", *TINY]))
    train_pcm(compose("train_pcm", [f"base={root / 'base'}", f"output_dir={root / 'pcm'}", "device=cpu", "steps=8",
                                    "trajectories=2", "collect_batch=2", "epochs=1", "batch_size=2",
                                    "eval_observations=1", "lora_rank=2"]))
    return root


# ---- pcm collect ----------------------------------------------------------------------------------------------
def test_collect_bad_input(tmp_path):
    out = tmp_path / "out"
    assert_user_error(pcm("collect", "task=nope", f"output_dir={out}"), "task/nope")
    assert_user_error(pcm("collect", "episodes=0", f"output_dir={out}"), "episodes=0")
    assert_user_error(pcm("collect", "episodes=-3", f"output_dir={out}"), "episodes=-3")
    assert_user_error(pcm("collect", "episodes=many", f"output_dir={out}"), "episodes")
    assert_user_error(pcm("collect", "episodez=3", f"output_dir={out}"), "episodez")
    assert_nothing_written(out)

    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert_user_error(pcm("collect", "episodes=1", f"output_dir={a_file / 'sub'}"), a_file)
    assert a_file.read_text() == "not a directory"


def test_collect_refuses_an_existing_corrupt_or_different_dataset(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "pusht_expert.zarr").write_bytes(b"\x00garbage" * 10)
    assert_user_error(pcm("collect", "episodes=1", f"output_dir={junk}"), "pusht_expert.zarr", "overwrite")

    broken = tmp_path / "broken"  # a zarr directory whose episode_ends run past the data
    from tests.fixtures import pusht_arrays

    arrays = pusht_arrays()
    arrays["episode_ends"][-1] = 400
    write_pusht_zarr(broken / "pusht_expert.zarr", arrays=arrays)
    assert_user_error(pcm("collect", "episodes=4", f"output_dir={broken}"), "pusht_expert.zarr", "episode_ends")

    other = tmp_path / "other"  # a good dataset with another number of episodes
    write_pusht_zarr(other / "pusht_expert.zarr")
    assert_user_error(pcm("collect", "episodes=2", f"output_dir={other}"), "pusht_expert.zarr", "4 episodes")
    for d in (junk, broken, other):  # untouched: no partial directory, no temporary names, no metrics
        assert sorted(p.name for p in d.iterdir()) == ["pusht_expert.zarr"]

    # overwrite=true replaces the junk file by a dataset (a directory over a file), leaving nothing else behind
    ok = pcm("collect", "episodes=1", "keep_failed=true", "task.max_steps=10", "overwrite=true", f"output_dir={junk}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    from pcm_policy.data.info import dataset_info

    assert dataset_info(junk / "pusht_expert.zarr")["episodes"] == 1
    assert sorted(p.name for p in junk.iterdir()) == ["metrics.json", "pusht_expert.zarr"]


# ---- pcm bench --------------------------------------------------------------------------------------------------
def test_bench_bad_input(runs, tmp_path):
    out = tmp_path / "bench"
    fast = ["device=cpu", "chunks=1", "warmup=0", "bases=[ddim2]", "early_stop=false", f"output_dir={out}"]
    assert_user_error(pcm("bench", f"checkpoint={tmp_path / 'nothing'}", *fast), "nothing")
    assert_user_error(pcm("bench", f"checkpoint={runs / 'base'}", "task=lift", *fast), "task", "lift")
    corrupt = tmp_path / "corrupt"
    from pcm_policy.checkpoint import latest_checkpoint

    shutil.copytree(latest_checkpoint(runs / "base"), corrupt)
    (corrupt / "policy.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_user_error(pcm("bench", f"checkpoint={corrupt}", *fast), "policy.safetensors")
    assert_user_error(pcm("bench", f"checkpoint={runs / 'other_base'}", f"+pcm.ddpm8={runs / 'pcm'}", *fast[:-2],
                          "bases=[ddpm8]", f"output_dir={out}"), "pcm", "another base")
    assert_user_error(pcm("bench", f"checkpoint={runs / 'base'}", *fast[1:], "device=cuda"), "device")
    assert_user_error(pcm("bench", f"checkpoint={runs / 'base'}", *fast, "chunks=0"), "chunks")
    assert_nothing_written(out)


# ---- pcm demo ---------------------------------------------------------------------------------------------------
def test_demo_bad_input(runs, tmp_path):
    out = tmp_path / "demo"
    common = ["device=cpu", f"output_dir={out}"]
    assert_user_error(pcm("demo", f"checkpoint={tmp_path / 'nothing'}", *common), "nothing")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", "episodez=2", *common), "episodez")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", "episodes=two", *common), "episodes")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", "sampler=nope", *common), "sampler/nope")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", "task=lift", *common), "task", "lift")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'other_base'}", "sampler.steps=8", f"+pcm_lora.ddim8={runs / 'pcm'}",
                          *common), "pcm", "another base")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", f"pcm_lora.ddim10={runs / 'pcm'}", *common),
                      "pcm_lora.ddim10", "trained for ddim8", "ddim10")
    assert_user_error(pcm("demo", f"checkpoint={runs / 'base'}", "device=cuda", f"output_dir={out}"), "device")
    assert_nothing_written(out)


# ---- absent devices ---------------------------------------------------------------------------------------------
def test_absent_cuda_is_one_line_for_every_command(runs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = write_pusht_zarr(tmp_path / "d.zarr")
    out = tmp_path / "o"
    cases = {
        "train": [f"dataset.path={data}"],
        "eval": [f"checkpoint={runs / 'base'}", "episodes=1", "videos=0"],
        "train-pcm": [f"base={runs / 'base'}"],
        "bench": [f"checkpoint={runs / 'base'}"],
    }
    for command, args in cases.items():
        assert_user_error(pcm(command, *args, "device=cuda", f"output_dir={out}"), "device='cuda'", "CUDA")
    assert_user_error(pcm("train", f"dataset.path={data}", "device=tpu", f"output_dir={out}"), "device='tpu'")
    assert_nothing_written(out)


def test_missing_expert_dataset_says_how_to_regenerate_it(tmp_path):
    """PickPlaceCan's demonstrations ship as their command only: a missing one names the file and the command."""
    missing = tmp_path / "can" / "can_expert.hdf5"
    result = pcm("train", "task=can", f"dataset.path={missing}", f"output_dir={tmp_path / 'run'}", "train.steps=1")
    assert_user_error(result, str(missing), "no such file",
                      f"pcm collect task=can episodes=200 seed=0 output_dir={missing.parent}", "data/can/README.md")
    assert not (tmp_path / "run").exists()
    result = pcm("data", "info", str(tmp_path / "pusht_expert.zarr"))
    assert_user_error(result, "no such file", "pcm collect task=pusht episodes=500 seed=0")


def test_bench_demo_and_train_pcm_refuse_a_base_whose_dataset_is_missing_before_work(runs, tmp_path):
    """All three draw observations from the base's dataset: a missing one is refused before any work."""
    base = tmp_path / "base"
    shutil.copytree(runs / "base", base)
    for run_config in base.rglob("config.yaml"):  # the dataset the checkpoint was trained on, moved away
        run_config.write_text(run_config.read_text().replace(str(runs / "d.zarr"),
                                                              str(tmp_path / "gone" / "pusht_expert.zarr")))
    for cmd, extra in (("bench", ["chunks=2", "bases=[ddim10]"]), ("demo", ["episodes=1", "chunks=2", "bases=[ddim10]"]),
                       ("train-pcm", ["steps=8", "lora_rank=2"])):
        out = tmp_path / f"out_{cmd}"
        key = "base" if cmd == "train-pcm" else "checkpoint"
        result = pcm(cmd, f"{key}={base}", f"output_dir={out}", "threads=1", *extra)
        assert_user_error(result, "pusht_expert.zarr: no such file", "pcm collect task=pusht")
        assert not out.exists()
