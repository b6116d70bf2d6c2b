"""Input integrity (issue 14): no silent fill values, every option checked before any work, no option that
quietly distorts actions, nothing written on refusal; and the Wilson interval of `pcm eval` (issue 15).

Commands run in-process through `pcm_policy.cli.main` (one line on stderr, exit status 2), with the work they
must not reach (datasets, weights, envs, collectors) replaced by tripwires, and the whole tree of the test's
folder listed before and after each refusal.
"""
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from pcm_policy.cli import main
from pcm_policy.config import compose
from pcm_policy.data.info import dataset_info
from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.data.replay_buffer import ReplayBuffer
from pcm_policy.data.robomimic import RobomimicFile
from pcm_policy.errors import ConfigError, DatasetError
from pcm_policy.episodes import EpisodeResult, summarize, wilson_interval
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.sampler_config import SamplerConfig
from tests.fixtures import pusht_arrays, write_pusht_zarr, write_robomimic_fixture

TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]


def tree(root) -> set[str]:
    """Every file and folder under `root`, relative: compared before and after a refused command."""
    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def assert_refused(capsys, root, *args, needles=()):
    """Exit 2, one `pcm: error:` line holding every needle, and no file or folder added or removed under root."""
    before = tree(root)
    code, err = run(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("pcm: error: "), (code, err)
    for needle in needles:
        assert str(needle) in err[0], err[0]
    assert tree(root) == before, sorted(tree(root) ^ before)
    return err[0]


class WorkStarted(BaseException):
    """Raised by a tripwire: the command started work before refusing (not caught by the CLI)."""


def _tripwire(name):
    def trip(*args, **kwargs):
        raise WorkStarted(name)
    return trip


@pytest.fixture
def no_work(monkeypatch):
    """Loading a dataset or weights, making an env, collecting or saving now raises WorkStarted."""
    import gymnasium

    import envs.collect_pusht
    import envs.collect_robomimic
    import pcm_policy.checkpoint

    monkeypatch.setattr(LowDimDataset, "from_config", _tripwire("dataset loaded"))
    monkeypatch.setattr(pcm_policy.checkpoint, "read_weights", _tripwire("weights loaded"))
    monkeypatch.setattr(pcm_policy.checkpoint, "save_checkpoint", _tripwire("checkpoint saved"))
    monkeypatch.setattr(gymnasium, "make", _tripwire("env made"))
    monkeypatch.setattr(gymnasium.vector, "SyncVectorEnv", _tripwire("env made"))
    monkeypatch.setattr(gymnasium.vector, "AsyncVectorEnv", _tripwire("env made"))
    monkeypatch.setattr(envs.collect_pusht, "collect_pusht", _tripwire("collection started"))
    monkeypatch.setattr(envs.collect_robomimic, "collect_robomimic", _tripwire("collection started"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny PushT base (T = 100 training timesteps) and a LoRA PCM trained for its ddim8 schedule."""
    from pcm_policy.pcm.training import train_pcm
    from pcm_policy.training import train

    root = tmp_path_factory.mktemp("integrity")
    data = write_pusht_zarr(root / "d.zarr", lengths=[30, 40, 25, 35, 28])
    train(compose("train", [f"dataset.path={data}", f"output_dir={root / 'base'}", "device=cpu", "train.steps=2",
                            "train.batch_size=16", "train.checkpoint_every=2", *TINY]))
    train_pcm(compose("train_pcm", [f"base={root / 'base'}", f"output_dir={root / 'pcm'}", "device=cpu", "steps=8",
                                    "trajectories=2", "collect_batch=2", "epochs=1", "batch_size=2",
                                    "eval_observations=1", "lora_rank=2"]))
    return root


# ==== 1. incomplete arrays are refused, never read as fill values ==============================================
def _zip_without(src: Path, dst: Path, member: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info.filename))
    return dst


@pytest.fixture
def broken_zarrs(tmp_path):
    """name -> (path, needles): PushT replay buffers whose data does not cover their declared shapes."""
    out = {}
    p = write_pusht_zarr(tmp_path / "missing.zarr")  # 7 chunks of 7 rows; drop the 4th
    os.remove(p / "data/action/3.0")
    out["missing chunk (dir)"] = (p, ["data/action: 6 of 7 chunks present", "data/action/3.0"])
    z = write_pusht_zarr(tmp_path / "full.zarr.zip")
    out["missing chunk (zip)"] = (_zip_without(z, tmp_path / "missing.zarr.zip", "data/action/3.0"),
                                  ["data/action: 6 of 7 chunks present"])
    p = write_pusht_zarr(tmp_path / "nested.zarr")  # chunks stored as a/3/0 while .zarray declares "." keys
    for chunk in sorted((p / "data/action").glob("[0-9]*.0")):
        (chunk.parent / chunk.name.split(".")[0]).mkdir()
        chunk.rename(chunk.parent / chunk.name.split(".")[0] / "0")
    out["chunks under another key layout"] = (p, ["data/action: 0 of 7 chunks present"])
    p = write_pusht_zarr(tmp_path / "truncated_blosc.zarr")
    chunk = p / "data/action/3.0"
    chunk.write_bytes(chunk.read_bytes()[:-8])  # numcodecs would decode this from memory past the buffer
    out["truncated Blosc chunk"] = (p, ["data/action", "data/action/3.0", "Blosc header"])
    p = write_pusht_zarr(tmp_path / "truncated_raw.zarr")
    chunk = p / "meta/episode_ends/0"
    chunk.write_bytes(chunk.read_bytes()[:-8])
    out["truncated uncompressed chunk"] = (p, ["meta/episode_ends", "truncated"])
    p = write_pusht_zarr(tmp_path / "missing_ends.zarr")
    os.remove(p / "meta/episode_ends/0")
    out["missing episode_ends chunk"] = (p, ["meta/episode_ends: 0 of 1 chunks present"])
    return out


def test_missing_chunk_count_agrees_with_zarr(broken_zarrs):
    path = broken_zarrs["missing chunk (dir)"][0]
    arr = zarr.open_group(str(path), mode="r")["data/action"]
    assert (arr.nchunks_initialized, arr.nchunks) == (6, 7)  # the count the message reports


def test_incomplete_zarr_refused_by_every_reader(broken_zarrs, capsys):
    for name, (path, needles) in broken_zarrs.items():
        with pytest.raises(DatasetError) as info:
            dataset_info(path)
        assert str(path) in str(info.value) and all(n in str(info.value) for n in needles), (name, info.value)
        with pytest.raises(DatasetError, match="data/action|episode_ends"):
            ReplayBuffer.open(path)
        with pytest.raises(DatasetError):
            LowDimDataset.from_config("pusht_zarr", path, horizon=16, n_obs_steps=2, n_action_steps=8)
        assert_refused(capsys, path.parent, "data", "info", path, needles=[str(path), *needles])


def test_incomplete_zarr_refused_by_pcm_train(broken_zarrs, capsys, tmp_path):
    path, needles = broken_zarrs["missing chunk (dir)"]
    assert_refused(capsys, tmp_path, "train", f"dataset.path={path}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                   "train.steps=2", *TINY, needles=needles)


def test_reading_a_subset_checks_that_subset():
    """A reader refuses the arrays it reads; `pcm data info` (which lists all of them) refuses any."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_pusht_zarr(Path(d) / "p.zarr")
        os.remove(path / "data/n_contacts/2.0")
        assert ReplayBuffer.open(path, keys=["state", "action"]).n_steps == 46
        with pytest.raises(DatasetError, match="data/n_contacts: 6 of 7"):
            ReplayBuffer.open(path)
        with pytest.raises(DatasetError, match="data/n_contacts: 6 of 7"):
            dataset_info(path)


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_all_zero_chunks_are_written_and_read_back(tmp_path, suffix):
    """zarr 3 skips all-fill chunks by default; the writers store them, so their files pass the check."""
    rb = ReplayBuffer()
    rb.add_episode({"action": np.ones((5, 2), np.float32), "n_contacts": np.zeros((5, 1), np.float32)})
    rb.add_episode({"action": np.ones((4, 2), np.float32), "n_contacts": np.zeros((4, 1), np.float32)})
    rb.save(tmp_path / f"b{suffix}", chunk_length=2)
    back = ReplayBuffer.open(tmp_path / f"b{suffix}")
    np.testing.assert_array_equal(back["n_contacts"], np.zeros((9, 1)))
    arrays = pusht_arrays()
    arrays["n_contacts"][:] = 0
    assert dataset_info(write_pusht_zarr(tmp_path / f"f{suffix}", arrays=arrays))["steps"] == 46


def _rewrite(path: Path, key: str, make) -> None:
    """Replace dataset `key` of an hdf5 file by `make(file, key, data)`."""
    with h5py.File(path, "a") as f:
        data = f[key][()]
        del f[key]
        make(f, key, data)


def _external(raw: Path):
    """A `make` for _rewrite: the dataset's bytes stored in the external raw file `raw`."""
    def make(f, k, data):
        f.create_dataset(k, shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, data.nbytes)])[...] = data
    return make


def _virtual(source: Path, rows: int | None = None):
    """A `make` for _rewrite: a virtual dataset mapping the first `rows` rows (all) to dataset "a" of `source`."""
    def make(f, k, data):
        n = len(data) if rows is None else rows
        with h5py.File(source, "w") as src:
            src["a"] = data[:n]
        layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        layout[:n] = h5py.VirtualSource(str(source), "a", shape=(n, *data.shape[1:]))
        f.create_virtual_dataset(k, layout, fillvalue=0)
    return make


@pytest.fixture
def broken_hdf5s(tmp_path):
    """name -> (path, needles): robomimic files whose datasets' storage does not cover their shapes."""
    out = {}
    key = "data/demo_0/actions"  # (8, 7)

    def partial_chunks(f, k, data):
        ds = f.create_dataset(k, shape=data.shape, dtype=data.dtype, chunks=(2, 7))
        ds[:4] = data[:4]  # chunks 2 and 3 never written
    p = write_robomimic_fixture(tmp_path / "chunks.hdf5")
    _rewrite(p, key, partial_chunks)
    out["chunks never written"] = (p, [f"{key}: 2 of 4 chunks present"])

    p = write_robomimic_fixture(tmp_path / "unallocated.hdf5")
    _rewrite(p, key, lambda f, k, data: f.create_dataset(k, shape=data.shape, dtype=data.dtype))
    out["contiguous, never written"] = (p, [key, "no data stored"])

    p = write_robomimic_fixture(tmp_path / "external.hdf5")
    _rewrite(p, key, _external(tmp_path / "raw.bin"))
    os.remove(tmp_path / "raw.bin")
    out["external file missing"] = (p, [key, "external data file", "raw.bin"])

    p = write_robomimic_fixture(tmp_path / "external_short.hdf5")
    _rewrite(p, key, _external(tmp_path / "short.bin"))
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(16)
    out["external file truncated"] = (p, [key, "short.bin", "truncated"])

    p = write_robomimic_fixture(tmp_path / "virtual.hdf5")
    _rewrite(p, key, _virtual(tmp_path / "source.h5"))
    os.remove(tmp_path / "source.h5")
    out["virtual source missing"] = (p, [key, "virtual source file", "source.h5"])

    p = write_robomimic_fixture(tmp_path / "virtual_half.hdf5")
    _rewrite(p, key, _virtual(tmp_path / "half.h5", rows=4))
    out["virtual mapping covers half"] = (p, [key, "cover 28 of 56 elements"])

    p = write_robomimic_fixture(tmp_path / "truncated.hdf5")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    out["truncated file"] = (p, ["truncated"])
    return out


@pytest.mark.parametrize("storage", ["virtual", "external"])
def test_complete_virtual_and_external_datasets_still_load(tmp_path, storage):
    p = write_robomimic_fixture(tmp_path / "v.hdf5")
    with h5py.File(p, "r") as f:
        expected = f["data/demo_0/actions"][()]
    make = _virtual(tmp_path / "source.h5") if storage == "virtual" else _external(tmp_path / "raw.bin")
    _rewrite(p, "data/demo_0/actions", make)
    with RobomimicFile(p) as rf:
        np.testing.assert_array_equal(rf.load_demo("demo_0")["actions"], expected)


def test_incomplete_hdf5_refused_by_every_reader(broken_hdf5s, capsys, tmp_path):
    for name, (path, needles) in broken_hdf5s.items():
        with pytest.raises(DatasetError) as info:
            dataset_info(path)
        assert str(path) in str(info.value) and all(n in str(info.value) for n in needles), (name, info.value)
        with pytest.raises(DatasetError):
            RobomimicFile(path)
        with pytest.raises(DatasetError):
            LowDimDataset.from_config("robomimic_hdf5", path, horizon=4, n_obs_steps=2, n_action_steps=2)
        assert_refused(capsys, tmp_path, "data", "info", path, needles=[str(path), *needles])
    path, needles = broken_hdf5s["chunks never written"]
    assert_refused(capsys, tmp_path, "train", "task=lift", f"dataset.path={path}", f"output_dir={tmp_path / 'out'}",
                   "device=cpu", "train.steps=2", "policy.horizon=4", "policy.n_action_steps=2", *TINY, needles=needles)


def test_incomplete_dataset_refused_by_train_pcm_and_bench(runs, broken_zarrs, capsys):
    """Commands that read a checkpoint's training set (train-pcm, bench) refuse it before writing anything."""
    path, needles = broken_zarrs["missing chunk (dir)"]
    assert_refused(capsys, runs, "train-pcm", f"base={runs / 'base'}", f"dataset_path={path}", "device=cpu",
                   f"output_dir={runs / 'new_pcm'}", "steps=8", needles=needles)
    data = runs / "d.zarr"  # the dataset the base's config.yaml names, which bench reads observations from
    shutil.copytree(data, runs / "d_ok.zarr")
    try:
        os.remove(data / "data/action/1.0")
        assert_refused(capsys, runs, "bench", f"checkpoint={runs / 'base'}", "device=cpu", "chunks=1", "warmup=0",
                       "bases=[ddim2]", "early_stop=false", f"output_dir={runs / 'bench'}",
                       needles=["data/action", "chunks present"])
    finally:
        shutil.rmtree(data)
        shutil.move(runs / "d_ok.zarr", data)


# ==== 2. every option checked against the config and the checkpoint before any work =========================
def _cases(runs):
    base, pcm_ckpt, out = runs / "base", runs / "pcm", runs / "out"
    data = runs / "d.zarr"
    a_file = runs / "d.zarr" / ".zgroup"
    ev = ["eval", f"checkpoint={base}", "device=cpu", "videos=0", f"output_dir={out}"]
    tr = ["train", f"dataset.path={data}", "device=cpu", "train.steps=2", f"output_dir={out}", *TINY]
    tp = ["train-pcm", f"base={base}", "device=cpu", "steps=8", f"output_dir={out}"]
    be = ["bench", f"checkpoint={base}", "device=cpu", "chunks=1", "warmup=0", "bases=[ddim2]", "early_stop=false",
          f"output_dir={out}"]
    de = ["demo", f"checkpoint={base}", "device=cpu", "sampler=ddim", f"output_dir={out}"]
    co = ["collect", f"output_dir={out}"]
    return [
        # eval: the sampler against the checkpoint's 100 training timesteps, then every other key
        (ev + ["sampler=ddim", "sampler.steps=200"], ["sampler.steps=200", "100"]),
        (ev + ["sampler.steps=101"], ["sampler.steps=101", "at most 100"]),
        (ev + ["sampler.steps=0"], ["sampler.steps=0"]),
        (ev + ["sampler=picard", "sampler.window=500"], ["sampler.window=500", "<= 100"]),
        (ev + ["sampler=picard", "sampler.tol=abc"], ["sampler.tol", "number"]),
        (ev + ["sampler=picard", "sampler.tol=-1"], ["sampler.tol=-1"]),
        (ev + ["sampler=picard", "sampler.max_iters=0"], ["sampler.max_iters=0"]),
        (ev + ["sampler=picard", "sampler.accel=magic"], ["sampler.accel='magic'"]),
        (ev + ["sampler=pcm", f"sampler.pcm_checkpoint={pcm_ckpt}", "sampler.scheduler=ddim", "sampler.steps=8",
               "sampler.start=noise_sum"], ["sampler.start=noise_sum", "trained from start=x_T"]),
        (ev + ["sampler=picard", "sampler.start=zeros"], ["sampler.start='zeros'"]),
        (ev + ["sampler=picard", "sampler.memory=11"], ["sampler.memory=11"]),
        (ev + ["sampler=picard", "sampler.damping=0"], ["sampler.damping=0"]),
        (be + ["accelerated.ddim10.memory=0"], ["accelerated.ddim10.memory=0"]),
        (be + ["accelerated.ddim10.start=zeros"], ["accelerated.ddim10.start='zeros'"]),
        (be + ["+accelerated.ddim10.speed=9"], ["accelerated.ddim10.speed"]),
        (ev + ["sampler=picard", "sampler.fixed_shape=maybe"], ["sampler.fixed_shape"]),
        (ev + ["sampler=pcm", f"sampler.pcm_checkpoint={pcm_ckpt}", "sampler.scheduler=ddim", "sampler.steps=8",
               "sampler.stiffness=0"], ["sampler.stiffness=0", "> 0"]),
        (ev + ["sampler=pcm"], ["sampler.pcm_checkpoint", "ddpm100"]),
        (ev + ["sampler=pcm", f"sampler.pcm_checkpoint={pcm_ckpt}"], ["sampler.pcm_checkpoint", "trained for ddim8",
                                                                         "ddpm100"]),
        (ev + ["sampler=pcm", f"sampler.pcm_checkpoint={base}", "sampler.scheduler=ddim", "sampler.steps=8"],
         ["sampler.pcm_checkpoint", "not a PCM"]),
        (ev + ["sampler=pcm", f"sampler.pcm_checkpoint={runs / 'nothing'}"], ["sampler.pcm_checkpoint", "not found"]),
        (ev + ["episodes=0"], ["episodes=0", ">= 1"]),
        (ev + ["n_envs=0"], ["n_envs=0"]),
        (ev + ["vector=bogus"], ["vector='bogus'", "sync"]),
        (ev + ["videos=-1"], ["videos=-1"]),
        (ev + ["task.max_steps=0"], ["task.max_steps=0"]),
        (ev + ["threads=0"], ["threads=0"]),
        (ev + ["seed_start=-5"], ["seed_start=-5"]),
        (ev + ["task.env_id=nope"], ["task.env_id='nope'", "registered"]),
        (ev + ["task=lift"], ["task", "pusht", "lift"]),
        (ev + ["device=tpu"], ["device='tpu'"]),
        (ev + [f"output_dir={a_file}/sub"], ["output_dir", ".zgroup", "not a directory"]),
        (["eval", f"checkpoint={pcm_ckpt}", f"output_dir={out}"], ["checkpoint", "PCM checkpoint"]),
        (["eval", f"checkpoint={runs / 'nothing'}", f"output_dir={out}"], ["checkpoint", "not found"]),
        (["eval", "policy=expert", "episodes=0", f"output_dir={out}"], ["episodes=0"]),
        # train
        (tr[:3] + [f"output_dir={out}", *TINY, "train.steps=0"], ["train.steps=0"]),
        (tr + ["train.batch_size=0"], ["train.batch_size=0"]),
        (tr + ["train.lr=0"], ["train.lr=0", "> 0"]),
        (tr + ["train.betas=[1.5,0.9]"], ["train.betas.0=1.5"]),
        (tr + ["train.betas=[0.9]"], ["train.betas"]),
        (tr + ["train.lr_scheduler=nope"], ["train.lr_scheduler='nope'", "cosine"]),
        (tr + ["train.checkpoint_every=0"], ["train.checkpoint_every=0"]),
        (tr + ["train.log_every=0"], ["train.log_every=0"]),
        (tr + ["train.keep_checkpoints=0"], ["train.keep_checkpoints=0"]),
        (tr + ["train.ema_max_decay=1.5"], ["train.ema_max_decay=1.5"]),
        (tr + ["train.ema_power=0"], ["train.ema_power=0"]),
        (tr + ["train.warmup_steps=-3"], ["train.warmup_steps=-3"]),
        (tr + ["train.weight_decay=-1"], ["train.weight_decay=-1"]),
        (tr + ["dataset.normalizer=nope"], ["dataset.normalizer='nope'"]),
        (tr + ["dataset.val_ratio=1.5"], ["dataset.val_ratio=1.5"]),
        (tr + ["dataset.max_train_episodes=0"], ["dataset.max_train_episodes=0"]),
        (tr + ["dataset.kind=nope"], ["dataset.kind='nope'"]),
        (tr + ["dataset.path=null"], ["dataset.path"]),
        (tr + ["dataset.obs_keys=[foo]"], ["dataset.obs_keys", "robomimic_hdf5 datasets only"]),
        (tr + ["dataset.abs_action=true"], ["dataset.abs_action=true", "robomimic_hdf5"]),
        (tr + ["task=lift", "dataset.obs_keys=[]"], ["dataset.obs_keys"]),
        (tr + ["policy.horizon=15"], ["policy.horizon=15", "divisible by 2"]),
        (tr + ["policy.n_obs_steps=0"], ["policy.n_obs_steps=0"]),
        (tr + ["policy.n_action_steps=20"], ["policy.n_action_steps=20", "horizon=16"]),
        (tr + ["policy.n_groups=5"], ["policy.n_groups=5", "down_dims"]),
        (tr + ["policy.kernel_size=4"], ["policy.kernel_size=4", "odd"]),
        (tr + ["policy.down_dims=[]"], ["policy.down_dims"]),
        (tr + ["policy.diffusion_step_embed_dim=31"], ["policy.diffusion_step_embed_dim=31", "even"]),
        (tr + ["policy.noise_scheduler.num_train_timesteps=0"], ["policy.noise_scheduler.num_train_timesteps=0"]),
        (tr + ["policy.noise_scheduler.beta_schedule=sigmoid"], ["policy.noise_scheduler.beta_schedule='sigmoid'"]),
        (tr + ["policy.noise_scheduler.prediction_type=v_prediction"], ["policy.noise_scheduler.prediction_type"]),
        (tr + ["policy.noise_scheduler.variance_type=fixed_large"], ["policy.noise_scheduler.variance_type"]),
        (tr + ["policy.noise_scheduler.clip_sample=maybe"], ["policy.noise_scheduler.clip_sample"]),
        (tr + ["+policy.noise_scheduler.thresholding=true"], ["policy.noise_scheduler.thresholding", "not supported"]),
        (tr[:3] + ["policy=expert", f"output_dir={out}"], ["policy=expert", "network policy"]),
        (tr + ["seed=-1"], ["seed=-1"]),
        (tr + ["threads=0"], ["threads=0"]),
        (tr + ["device=tpu"], ["device='tpu'"]),
        (tr + ["dataset.normalizer=gaussian"], ["dataset.normalizer=gaussian", "policy.noise_scheduler.clip_sample"]),
        (tr + ["dataset.normalizer=identity"], ["dataset.normalizer=identity", "policy.noise_scheduler.clip_sample"]),
        # train-pcm
        (tp[:3] + ["steps=200", f"output_dir={out}"], ["steps=200", "100"]),
        (tp + ["scheduler=foo"], ["scheduler='foo'"]),
        (tp + ["mode=foo"], ["mode='foo'"]),
        (tp + ["trajectories=0"], ["trajectories=0"]),
        (tp + ["collect_batch=0"], ["collect_batch=0"]),
        (tp + ["epochs=0"], ["epochs=0"]),
        (tp + ["batch_size=0"], ["batch_size=0"]),
        (tp + ["eval_observations=0"], ["eval_observations=0"]),
        (tp + ["lora_rank=0"], ["lora_rank=0"]),
        (tp + ["lora_alpha=-1"], ["lora_alpha=-1"]),
        (tp + ["lr=-1"], ["lr=-1"]),
        (tp + ["ema_decay=2"], ["ema_decay=2"]),
        (tp + ["stiffness=0"], ["stiffness=0"]),
        (tp + ["eval_tol=-1"], ["eval_tol=-1"]),
        (tp + ["collect_tol=-1"], ["collect_tol=-1"]),
        (tp + ["max_k=0"], ["max_k=0"]),
        (tp + ["checkpoint_every=0"], ["checkpoint_every=0"]),
        (tp + ["eval_window=9"], ["eval_window=9", "steps=8"]),
        (tp + ["collect_max_iters=0"], ["collect_max_iters=0"]),
        (tp + ["start=zeros"], ["start='zeros'"]),
        (tp + ["observations=replay"], ["observations='replay'"]),
        (tp + ["eval_accel.memory=0"], ["eval_accel.memory=0"]),
        (tp + ["eval_accel.accel=magic"], ["eval_accel.accel='magic'"]),
        (tp + ["observations=closed_loop", "closed_loop.episodes=0"], ["closed_loop.episodes=0"]),
        (tp + ["observations=closed_loop", "closed_loop.sampler.steps=101"], ["closed_loop.sampler.steps=101", "100"]),
        (tp + ["observations=closed_loop", "closed_loop.sampler.name=pcm"], ["closed_loop.sampler.name=pcm"]),
        (tp + [f"dataset_path={runs / 'nothing'}"], ["dataset_path", "no such file"]),
        (tp + ["seed=-1"], ["seed=-1"]),
        (["train-pcm", f"base={pcm_ckpt}", f"output_dir={out}"], ["base", "PCM checkpoint"]),
        (["train-pcm", f"output_dir={out}"], ["base"]),
        # bench
        (be[:5] + ["bases=[ddim200]", "early_stop=false", f"output_dir={out}"], ["bases", "ddim200", "100"]),
        (be + ["bases=[]"], ["bases"]),
        (be + ["bases=[ddim2,ddim2]"], ["bases", "twice"]),
        (be + ["bases=[euler5]"], ["bases", "euler5"]),
        (be + ["tol=-1"], ["tol=-1"]),
        (be + ["window=0"], ["window=0"]),
        (be + ["stiffness=0"], ["stiffness=0"]),
        (be + ["control_hz=0"], ["control_hz=0"]),
        (be + ["budget_ms=-1"], ["budget_ms=-1"]),
        (be + ["episodes_bases=[ddim7]"], ["episodes_bases", "ddim2"]),
        (be + ["early_stop_chunks=0"], ["early_stop_chunks=0"]),
        (be + ["chunks=0"], ["chunks=0"]),
        (be + ["warmup=-1"], ["warmup=-1"]),
        (be + ["chunks_by_base.ddim10=0"], ["chunks_by_base.ddim10=0"]),
        (be + ["episodes=-1"], ["episodes=-1"]),
        (be + ["episodes=1", "seed_start=-1"], ["seed_start=-1"]),
        (be + ["threads=0"], ["threads=0"]),
        (be + [f"+pcm.ddim2={runs / 'nothing'}"], ["pcm.ddim2", "not found"]),
        (be + [f"+pcm.ddim2={base}"], ["pcm.ddim2", "not a PCM"]),
        (be + ["task=lift"], ["task", "lift"]),
        # demo
        (de + ["sampler.steps=200"], ["sampler.steps=200", "100"]),
        (de + ["bases=[ddim200]"], ["bases", "ddim200"]),
        (de + ["sampler.tol=-1"], ["sampler.tol=-1"]),
        (de + ["episodes=0"], ["episodes=0"]),
        (de + ["chunks=0"], ["chunks=0"]),
        (de + ["ddpm100_chunks=0"], ["ddpm100_chunks=0"]),
        (de + ["threads=0"], ["threads=0"]),
        (["demo", f"checkpoint={base}", "device=cpu", f"pcm_lora.ddim10={pcm_ckpt}", f"output_dir={out}"],
         ["pcm_lora.ddim10", "trained for ddim8"]),
        (["demo", f"checkpoint={base}", "device=cpu", "sampler.stiffness=0", f"output_dir={out}"],
         ["sampler.stiffness=0"]),
        # collect
        (co + ["episodes=0"], ["episodes=0"]),
        (co + ["seed=-1"], ["seed=-1"]),
        (co + ["task.max_steps=0"], ["task.max_steps=0"]),
        (co + ["output_name=a/b.zarr"], ["output_name"]),
        (co + ["task.name=foo"], ["task.name='foo'"]),
        (co + ["task=lift", "images=true"], ["images=true", "lift"]),
        (co + ["keep_failed=maybe"], ["keep_failed"]),
        (["collect", f"output_dir={a_file}/sub"], ["output_dir", "not a directory"]),
    ]


def test_every_command_refuses_bad_options_before_any_work(runs, capsys, no_work):
    """One line naming the key (and its limit), exit 2, no dataset, weights or env touched, nothing written."""
    for args, needles in _cases(runs):
        try:
            assert_refused(capsys, runs, *args, needles=needles)
        except AssertionError as e:
            raise AssertionError(f"{' '.join(map(str, args))}: {e}") from None


def test_headline_case_with_the_shipped_checkpoint(capsys, no_work, tmp_path):
    """The issue's report: sampler.steps beyond the shipped base's 100 training timesteps, before any env."""
    from pcm_policy.config import REPO_ROOT

    if not (REPO_ROOT / "data/pusht/base").exists():
        pytest.skip("no shipped PushT base")
    assert_refused(capsys, tmp_path, "eval", "checkpoint=data/pusht/base", "sampler=ddim", "sampler.steps=200",
                   "episodes=1", f"output_dir={tmp_path / 'eval'}", needles=["sampler.steps=200", "at most 100"])


def test_export_refuses_to_replace_its_source_or_other_data(runs, capsys):
    from pcm_policy.checkpoint import latest_checkpoint

    base = runs / "base"
    step = latest_checkpoint(base)
    assert_refused(capsys, runs, "export", base, base, needles=["output", "being exported"])
    assert_refused(capsys, runs, "export", step, base / "checkpoints", needles=["output", "being exported"])
    assert_refused(capsys, runs, "export", base, runs, needles=["being exported"])
    assert_refused(capsys, runs, "export", base, runs / "d.zarr", needles=["not a checkpoint directory"])
    assert_refused(capsys, runs, "export", base, runs / "d.zarr" / ".zgroup", needles=["not a directory"])
    assert_refused(capsys, runs, "export", runs / "nothing", runs / "exported", needles=["not found"])
    code, _ = run(capsys, "export", base, runs / "exported")  # a new folder, then over its own older copy
    assert code == 0
    assert run(capsys, "export", base, runs / "exported", "--dtype", "float32")[0] == 0
    shutil.rmtree(runs / "exported")


def test_sampler_accepts_the_limits_exactly(runs, tmp_path):
    """The boundary values themselves pass: steps = T, window = steps."""
    from pcm_policy.validation import validate

    cfg = compose("eval", [f"checkpoint={runs / 'base'}", "sampler=picard", "sampler.steps=100", "sampler.window=100",
                           f"output_dir={tmp_path}", "device=cpu"])
    validate("eval", cfg)
    cfg = compose("train_pcm", [f"base={runs / 'base'}", "steps=100", "eval_window=100", f"output_dir={tmp_path}"])
    validate("train_pcm", cfg)


# ==== 3. clip_sample must cover the normalized training actions ===========================================
PUSHT_LOW, PUSHT_HIGH = 9.0, 503.0  # PushT target positions span about 9..503 px


class OracleDenoiser(torch.nn.Module):
    """Predicts the epsilon whose x0 estimate is exactly `target` (normalized (H, Da)), at every timestep."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.register_buffer("abar", alphas_cumprod.float())
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # DiffusionPolicy.device reads a parameter

    def forward(self, x, t, cond):
        a = self.abar[t].view(-1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def _pusht_like_policy(mode: str, clip: bool, clip_range: float | None = None) -> DiffusionPolicy:
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"obs": rng.normal(size=(500, 4)), "action": rng.uniform(PUSHT_LOW, PUSHT_HIGH, (500, 2))},
                          mode=mode)
    sched = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                 clip_sample=clip, variance_type="fixed_small")
    if clip_range is not None:
        sched["clip_sample_range"] = clip_range
    cfg = PolicyConfig(obs_dim=4, action_dim=2, down_dims=(8, 16), diffusion_step_embed_dim=16, n_groups=4,
                       noise_scheduler=sched)
    return DiffusionPolicy(cfg, norm)


def _sample_far_corner(policy: DiffusionPolicy) -> torch.Tensor:
    """Sample a chunk whose denoiser aims every action at the data's upper corner; returns raw actions."""
    corner = policy.normalizer.params["action"]["max"]
    target = policy.normalizer.normalize("action", corner.expand(policy.config.horizon, 2).clone())
    policy.model = OracleDenoiser(target, policy.noise_scheduler.alphas_cumprod)
    chunk = policy.predict_chunk(torch.zeros(1, 2, 4), SamplerConfig(scheduler="ddim", steps=10),
                                 generator=torch.Generator().manual_seed(0))
    return chunk.action_pred[0], corner


@pytest.mark.parametrize("mode", ["gaussian", "identity"])
def test_clip_sample_with_a_normalizer_it_does_not_cover_is_refused(mode):
    with pytest.raises(ConfigError, match="dataset.normalizer.*policy.noise_scheduler.clip_sample"):
        _pusht_like_policy(mode, clip=True)
    with pytest.raises(ConfigError, match="clip_sample"):  # a range that still misses the data
        _pusht_like_policy("gaussian", clip=True, clip_range=1.5)


@pytest.mark.parametrize("mode,clip", [("limits", True), ("gaussian", False), ("identity", False),
                                       ("gaussian", True)])
def test_sampled_actions_reach_the_edge_of_the_training_range(mode, clip):
    """Every accepted combination samples the far corner of the data (503 px), not mean + 1 std (~400)."""
    policy = _pusht_like_policy(mode, clip=clip, clip_range=4.0 if (mode, clip) == ("gaussian", True) else None)
    actions, corner = _sample_far_corner(policy)
    np.testing.assert_allclose(actions.numpy(), corner.expand_as(actions).numpy(), rtol=1e-4, atol=1e-2)
    assert float(actions.max()) > 500.0


def test_an_early_stopped_chunk_is_kept_in_the_training_range_not_in_minus_one_one():
    policy = _pusht_like_policy("gaussian", clip=False)
    low, high = policy.normalized_action_range()
    p = policy.normalizer.params["action"]
    np.testing.assert_allclose(low.numpy(), (p["min"] - p["mean"]).div(p["std"]).numpy(), rtol=1e-5)
    assert float(high.min()) > 1.5  # gaussian: the data's edge lies beyond 1 std
    policy.model = OracleDenoiser(torch.full((16, 2), 5.0), policy.noise_scheduler.alphas_cumprod)  # far outside
    one_round = SamplerConfig(name="picard", scheduler="ddim", steps=10, max_iters=1)
    chunk = policy.predict_chunk(torch.zeros(1, 2, 4), one_round, generator=torch.Generator().manual_seed(0))
    assert not chunk.stats.converged
    raw = chunk.action_pred[0]
    assert float(raw.max()) <= PUSHT_HIGH + 1e-3 and float(raw.min()) >= PUSHT_LOW - 1e-3
    assert bool((raw > p["mean"] + p["std"]).all())  # a [-1, 1] clamp would stop at mean + 1 std (~400 px)


def test_pcm_train_refuses_a_clip_range_that_misses_the_data_and_writes_nothing(capsys, tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    assert_refused(capsys, tmp_path, "train", f"dataset.path={data}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                   "train.steps=2", *TINY, "dataset.normalizer=gaussian",
                   "+policy.noise_scheduler.clip_sample_range=1.2",                   needles=["dataset.normalizer", "policy.noise_scheduler.clip_sample"])


# ==== 4. nothing written on refusal, also when training is refused after it started ========================
def test_training_refused_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    from pcm_policy.training import train

    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    monkeypatch.setattr(DiffusionPolicy, "compute_loss",
                        lambda self, batch, **kw: torch.tensor(float("nan"), requires_grad=True))
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="loss became nan"):
        train(compose("train", [f"dataset.path={data}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                                "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", *TINY]))
    assert tree(tmp_path) == before


# ==== issue 15 item 2: Wilson score interval ==============================================================
@pytest.mark.parametrize("k,n,lo,hi", [(19, 50, 0.2586, 0.5185), (24, 50, 0.3480, 0.6149), (0, 10, 0.0, 0.2775),
                                       (10, 10, 0.7225, 1.0), (1, 1, 0.2065, 1.0), (50, 100, 0.4038, 0.5962)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


def test_summary_carries_the_interval():
    results = [EpisodeResult(i, 100000 + i, i < 19, None, 10) for i in range(50)]
    s = summarize(results, "lift")
    assert s["success_rate"] == 0.38 and s["success_ci95"] == pytest.approx([0.2586, 0.5185], abs=1e-4)
    assert summarize([], "lift")["success_ci95"] == [0.0, 1.0]
