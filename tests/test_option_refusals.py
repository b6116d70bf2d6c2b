"""Every command checks every option against its config and the checkpoints it names before any work: one line
naming the key (and its limit), exit status 2, no dataset, weights or env touched, nothing written. One test id per
refused case (`pcm_policy.commands.*.Config.from_hydra`), plus the limits themselves, which pass."""
import shutil

import pytest

from pcm_policy.commands import build_config
from pcm_policy.paths import REPO_ROOT
from tests.fixtures import TINY_POLICY, assert_refused, run_cli

EV = ["eval", "checkpoint={base}", "device=cpu", "videos=0", "output_dir={out}"]
TR = ["train", "dataset.path={data}", "device=cpu", "train.steps=2", "output_dir={out}", *TINY_POLICY]
TP = ["train-pcm", "base={base}", "device=cpu", "steps=8", "output_dir={out}"]
BE = ["bench", "checkpoint={base}", "device=cpu", "chunks=1", "warmup=0", "schedules=[ddim2]", "early_stop=false",
      "output_dir={out}"]
DE = ["demo", "checkpoint={base}", "device=cpu", "sampler=ddim", "output_dir={out}"]
CO = ["collect", "output_dir={out}"]


def _case(args: list[str], needles: list[str]):
    """A refused command line (templates: {base} {pcm} {data} {out} {file} {nothing}), its id the options that
    differ from the command's valid line."""
    valid = {"eval": EV, "train": TR, "train-pcm": TP, "bench": BE, "demo": DE, "collect": CO}[args[0]]
    extra = [a for a in args[1:] if a not in valid] or args[1:]
    return pytest.param(args, needles, id=f"{args[0]} {' '.join(extra)}")


CASES = [_case(*c) for c in [
        # eval: the sampler against the checkpoint's 100 training timesteps, then every other key
        (EV + ["sampler=ddim", "sampler.steps=200"], ["sampler.steps=200", "100"]),
        (EV + ["sampler.steps=101"], ["sampler.steps=101", "at most 100"]),
        (EV + ["sampler.steps=0"], ["sampler.steps=0"]),
        (EV + ["sampler=picard", "sampler.window=500"], ["sampler.window=500", "<= 100"]),
        (EV + ["sampler=picard", "sampler.tol=abc"], ["sampler.tol", "number"]),
        (EV + ["sampler=picard", "sampler.tol=-1"], ["sampler.tol=-1"]),
        (EV + ["sampler=picard", "sampler.max_iters=0"], ["sampler.max_iters=0"]),
        (EV + ["sampler=picard", "sampler.accel=magic"], ["sampler.accel='magic'"]),
        (EV + ["sampler=pcm", "sampler.pcm_checkpoint={pcm}", "sampler.scheduler=ddim", "sampler.steps=8",
               "sampler.start=noise_sum"], ["sampler.start=noise_sum", "trained from start=x_T"]),
        (EV + ["sampler=picard", "sampler.start=zeros"], ["sampler.start='zeros'"]),
        (EV + ["sampler=picard", "sampler.memory=11"], ["sampler.memory=11"]),
        (EV + ["sampler=picard", "sampler.damping=0"], ["sampler.damping=0"]),
        (BE + ["accelerated.ddim10.memory=0"], ["accelerated.ddim10.memory=0"]),
        (BE + ["accelerated.ddim10.start=zeros"], ["accelerated.ddim10.start='zeros'"]),
        (BE + ["+accelerated.ddim10.speed=9"], ["accelerated.ddim10.speed"]),
        (EV + ["sampler=picard", "sampler.fixed_shape=maybe"], ["sampler.fixed_shape"]),
        (EV + ["sampler=pcm", "sampler.pcm_checkpoint={pcm}", "sampler.scheduler=ddim", "sampler.steps=8",
               "sampler.stiffness=0"], ["sampler.stiffness=0", "> 0"]),
        (EV + ["sampler=pcm"], ["sampler.pcm_checkpoint", "ddpm100"]),
        (EV + ["sampler=pcm", "sampler.pcm_checkpoint={pcm}"], ["sampler.pcm_checkpoint", "trained for ddim8",
                                                                         "ddpm100"]),
        (EV + ["sampler=pcm", "sampler.pcm_checkpoint={base}", "sampler.scheduler=ddim", "sampler.steps=8"],
         ["sampler.pcm_checkpoint", "not a PCM"]),
        (EV + ["sampler=pcm", "sampler.pcm_checkpoint={nothing}"], ["sampler.pcm_checkpoint", "not found"]),
        (EV + ["episodes=0"], ["episodes=0", ">= 1"]),
        (EV + ["n_envs=0"], ["n_envs=0"]),
        (EV + ["vector=bogus"], ["vector='bogus'", "sync"]),
        (EV + ["videos=-1"], ["videos=-1"]),
        (EV + ["task.max_steps=0"], ["task.max_steps=0"]),
        (EV + ["threads=0"], ["threads=0"]),
        (EV + ["backend=tensorrt"], ["backend='tensorrt'", "torch, onnx, auto"]),
        (EV + ["seed_start=-5"], ["seed_start=-5"]),
        (EV + ["task.env_id=nope"], ["task.env_id='nope'", "registered"]),
        (EV + ["task=lift"], ["task", "pusht", "lift"]),
        (EV + ["device=tpu"], ["device='tpu'"]),
        (EV + ["output_dir={file}/sub"], ["output_dir", ".zgroup", "not a directory"]),
        (["eval", "checkpoint={pcm}", "output_dir={out}"], ["checkpoint", "PCM checkpoint"]),
        (["eval", "checkpoint={nothing}", "output_dir={out}"], ["checkpoint", "not found"]),
        (["eval", "policy=expert", "episodes=0", "output_dir={out}"], ["episodes=0"]),
        # train
        (TR[:3] + ["output_dir={out}", *TINY_POLICY, "train.steps=0"], ["train.steps=0"]),
        (TR + ["train.batch_size=0"], ["train.batch_size=0"]),
        (TR + ["task=lift_image"], ["task=lift_image gives camera images", "policy=unet_small_image_robomimic"]),
        (TR + ["train.lr=0"], ["train.lr=0", "> 0"]),
        (TR + ["train.betas=[1.5,0.9]"], ["train.betas.0=1.5"]),
        (TR + ["train.betas=[0.9]"], ["train.betas"]),
        (TR + ["train.lr_scheduler=nope"], ["train.lr_scheduler='nope'", "cosine"]),
        (TR + ["train.checkpoint_every=0"], ["train.checkpoint_every=0"]),
        (TR + ["train.log_every=0"], ["train.log_every=0"]),
        (TR + ["train.keep_checkpoints=0"], ["train.keep_checkpoints=0"]),
        (TR + ["train.ema_max_decay=1.5"], ["train.ema_max_decay=1.5"]),
        (TR + ["train.ema_power=0"], ["train.ema_power=0"]),
        (TR + ["train.warmup_steps=-3"], ["train.warmup_steps=-3"]),
        (TR + ["train.weight_decay=-1"], ["train.weight_decay=-1"]),
        (TR + ["dataset.normalizer=nope"], ["dataset.normalizer='nope'"]),
        (TR + ["dataset.val_ratio=1.5"], ["dataset.val_ratio=1.5"]),
        (TR + ["dataset.max_train_episodes=0"], ["dataset.max_train_episodes=0"]),
        (TR + ["dataset.kind=nope"], ["dataset.kind='nope'"]),
        (TR + ["dataset.path=null"], ["dataset.path"]),
        (TR + ["dataset.obs_keys=[foo]"], ["dataset.obs_keys", "robomimic_hdf5 datasets only"]),
        (TR + ["dataset.abs_action=true"], ["dataset.abs_action=true", "robomimic_hdf5"]),
        (TR + ["task=lift", "dataset.obs_keys=[]"], ["dataset.obs_keys"]),
        (TR + ["policy.horizon=15"], ["policy.horizon=15", "divisible by 2"]),
        (TR + ["policy.n_obs_steps=0"], ["policy.n_obs_steps=0"]),
        (TR + ["policy.n_action_steps=20"], ["policy.n_action_steps=20", "horizon=16"]),
        (TR + ["policy.n_groups=5"], ["policy.n_groups=5", "down_dims"]),
        (TR + ["policy.kernel_size=4"], ["policy.kernel_size=4", "odd"]),
        (TR + ["policy.down_dims=[]"], ["policy.down_dims"]),
        (TR + ["policy.diffusion_step_embed_dim=31"], ["policy.diffusion_step_embed_dim=31", "even"]),
        (TR + ["policy.noise_scheduler.num_train_timesteps=0"], ["policy.noise_scheduler.num_train_timesteps=0"]),
        (TR + ["policy.noise_scheduler.beta_schedule=sigmoid"], ["policy.noise_scheduler.beta_schedule='sigmoid'"]),
        (TR + ["policy.noise_scheduler.prediction_type=v_prediction"], ["policy.noise_scheduler.prediction_type"]),
        (TR + ["policy.noise_scheduler.variance_type=fixed_large"], ["policy.noise_scheduler.variance_type"]),
        (TR + ["policy.noise_scheduler.clip_sample=maybe"], ["policy.noise_scheduler.clip_sample"]),
        (TR + ["+policy.noise_scheduler.thresholding=true"], ["policy.noise_scheduler.thresholding", "not supported"]),
        (TR[:3] + ["policy=expert", "output_dir={out}"], ["policy=expert", "network policy"]),
        (TR + ["seed=-1"], ["seed=-1"]),
        (TR + ["threads=0"], ["threads=0"]),
        (TR + ["device=tpu"], ["device='tpu'"]),
        (TR + ["dataset.normalizer=gaussian"], ["dataset.normalizer=gaussian", "policy.noise_scheduler.clip_sample"]),
        (TR + ["dataset.normalizer=identity"], ["dataset.normalizer=identity", "policy.noise_scheduler.clip_sample"]),
        # train-pcm
        (TP[:3] + ["steps=200", "output_dir={out}"], ["steps=200", "100"]),
        (TP + ["scheduler=foo"], ["scheduler='foo'"]),
        (TP + ["mode=foo"], ["mode='foo'"]),
        (TP + ["trajectories=0"], ["trajectories=0"]),
        (TP + ["collect_batch=0"], ["collect_batch=0"]),
        (TP + ["epochs=0"], ["epochs=0"]),
        (TP + ["batch_size=0"], ["batch_size=0"]),
        (TP + ["eval_observations=0"], ["eval_observations=0"]),
        (TP + ["lora_rank=0"], ["lora_rank=0"]),
        (TP + ["lora_alpha=-1"], ["lora_alpha=-1"]),
        (TP + ["lr=-1"], ["lr=-1"]),
        (TP + ["ema_decay=2"], ["ema_decay=2"]),
        (TP + ["stiffness=0"], ["stiffness=0"]),
        (TP + ["eval_tol=-1"], ["eval_tol=-1"]),
        (TP + ["collect_tol=-1"], ["collect_tol=-1"]),
        (TP + ["max_k=0"], ["max_k=0"]),
        (TP + ["slot_weighting=last"], ["slot_weighting='last'"]),
        (TP + ["checkpoint_every=0"], ["checkpoint_every=0"]),
        (TP + ["eval_window=9"], ["eval_window=9", "steps=8"]),
        (TP + ["collect_max_iters=0"], ["collect_max_iters=0"]),
        (TP + ["start=zeros"], ["start='zeros'"]),
        (TP + ["observations=replay"], ["observations='replay'"]),
        (TP + ["eval_accel.memory=0"], ["eval_accel.memory=0"]),
        (TP + ["eval_accel.accel=magic"], ["eval_accel.accel='magic'"]),
        (TP + ["observations=closed_loop", "closed_loop.episodes=0"], ["closed_loop.episodes=0"]),
        (TP + ["observations=closed_loop", "closed_loop.sampler.steps=101"], ["closed_loop.sampler.steps=101", "100"]),
        (TP + ["observations=closed_loop", "closed_loop.sampler.name=pcm"], ["closed_loop.sampler.name=pcm"]),
        (TP + ["dataset_path={nothing}"], ["dataset_path", "no such file"]),
        (TP + ["seed=-1"], ["seed=-1"]),
        (["train-pcm", "base={pcm}", "output_dir={out}"], ["base", "PCM checkpoint"]),
        (["train-pcm", "output_dir={out}"], ["base"]),
        # bench
        (BE[:5] + ["schedules=[ddim200]", "early_stop=false", "output_dir={out}"], ["schedules", "ddim200", "100"]),
        (BE + ["schedules=[]"], ["schedules"]),
        (BE + ["schedules=[ddim2,ddim2]"], ["schedules", "twice"]),
        (BE + ["schedules=[euler5]"], ["schedules", "euler5"]),
        (BE + ["tol=-1"], ["tol=-1"]),
        (BE + ["window=0"], ["window=0"]),
        (BE + ["stiffness=0"], ["stiffness=0"]),
        (BE + ["control_hz=0"], ["control_hz=0"]),
        (BE + ["budget_ms=-1"], ["budget_ms=-1"]),
        (BE + ["episodes_schedules=[ddim7]"], ["episodes_schedules", "ddim2"]),
        (BE + ["early_stop_chunks=0"], ["early_stop_chunks=0"]),
        (BE + ["chunks=0"], ["chunks=0"]),
        (BE + ["warmup=-1"], ["warmup=-1"]),
        (BE + ["chunks_by_schedule.ddim10=0"], ["chunks_by_schedule.ddim10=0"]),
        (BE + ["episodes=-1"], ["episodes=-1"]),
        (BE + ["episodes=1", "seed_start=-1"], ["seed_start=-1"]),
        (BE + ["threads=0"], ["threads=0"]),
        (BE + ["backend=tensorrt"], ["backend='tensorrt'", "torch, onnx, auto"]),
        (BE + ["+pcm.ddim2={nothing}"], ["pcm.ddim2", "not found"]),
        (BE + ["+pcm.ddim2={base}"], ["pcm.ddim2", "not a PCM"]),
        (BE + ["task=lift"], ["task", "lift"]),
        (BE + ["backends=[torch,tensorflow]"], ["backends", "tensorflow", "torch, onnx, auto"]),
        (BE + ["backends=[]"], ["backends=[]", "non-empty list"]),
        (BE + ["backends=onnx"], ["backends='onnx'", "list"]),
        (BE + ["backends=[onnx,onnx]"], ["backends", "twice"]),
        (BE + ["peak_gflops=0"], ["peak_gflops=0"]),
        (EV + ["sampler=auto", "sampler.backends=[torch,jax]"], ["sampler.backends", "jax"]),
        (EV + ["sampler=auto", "sampler.tols=[]"], ["sampler.tols"]),
        (EV + ["sampler=auto", "sampler.threads=[0]"], ["sampler.threads.0=0"]),
        (EV + ["sampler=auto", "sampler.chunks=0"], ["sampler.chunks=0"]),
        (EV + ["sampler=auto", "sampler.steps=101"], ["sampler.steps=101", "at most 100"]),
        (EV + ["sampler=auto", "sampler.pcm_checkpoint={pcm}"], ["sampler.pcm_checkpoint", "trained for ddim8",
                                                                  "ddim10"]),
        (EV + ["sampler=auto", "+sampler.speed=2"], ["sampler", "speed"]),
        # demo
        (DE + ["sampler.steps=200"], ["sampler.steps=200", "100"]),
        (DE + ["schedules=[ddim200]"], ["schedules", "ddim200"]),
        (DE + ["sampler.tol=-1"], ["sampler.tol=-1"]),
        (DE + ["episodes=0"], ["episodes=0"]),
        (DE + ["chunks=0"], ["chunks=0"]),
        (DE + ["ddpm100_chunks=0"], ["ddpm100_chunks=0"]),
        (DE + ["threads=0"], ["threads=0"]),
        (DE + ["backends=[torch,tpu]"], ["backends", "tpu"]),
        (DE + ["sampler=auto", "sampler.max_seconds=0"], ["sampler.max_seconds=0"]),
        (DE + ["backend=tensorrt"], ["backend='tensorrt'", "torch, onnx, auto"]),
        (["demo", "checkpoint={base}", "device=cpu", "pcm_lora.ddim10={pcm}", "output_dir={out}"],
         ["pcm_lora.ddim10", "trained for ddim8"]),
        (["demo", "checkpoint={base}", "device=cpu", "sampler.stiffness=0", "output_dir={out}"],
         ["sampler.stiffness=0"]),
        # collect
        (CO + ["episodes=0"], ["episodes=0"]),
        (CO + ["seed=-1"], ["seed=-1"]),
        (CO + ["task.max_steps=0"], ["task.max_steps=0"]),
        (CO + ["output_name=a/b.zarr"], ["output_name"]),
        (CO + ["task.name=foo"], ["task.name='foo'"]),
        (CO + ["keep_failed=maybe"], ["keep_failed"]),
        (["collect", "output_dir={file}/sub"], ["output_dir", "not a directory"]),
]]


def _paths(runs) -> dict[str, str]:
    return {"base": runs / "base", "pcm": runs / "pcm", "data": runs / "d.zarr", "out": runs / "out",
            "file": runs / "d.zarr" / ".zgroup", "nothing": runs / "nothing"}


@pytest.mark.parametrize("args,needles", CASES)
def test_refused_before_any_work(tiny_runs, capsys, no_work, args, needles):
    paths = _paths(tiny_runs)
    assert_refused(capsys, tiny_runs, *[a.format(**paths) for a in args], needles=needles)


def test_headline_case_with_the_shipped_checkpoint(capsys, no_work, tmp_path):
    """sampler.steps beyond the shipped base's 100 training timesteps is refused before any env."""
    if not (REPO_ROOT / "data/pusht/base").exists():
        pytest.skip("no shipped PushT base")
    assert_refused(capsys, tmp_path, "eval", "checkpoint=data/pusht/base", "sampler=ddim", "sampler.steps=200",
                   "episodes=1", f"output_dir={tmp_path / 'eval'}", needles=["sampler.steps=200", "at most 100"])


def test_export_refuses_to_replace_its_source_or_other_data(tiny_runs, capsys, tmp_path):
    from pcm_policy.checkpoint import latest_checkpoint

    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs / "base", runs / "base")
    shutil.copytree(tiny_runs / "d.zarr", runs / "d.zarr")
    base = runs / "base"
    step = latest_checkpoint(base)
    assert_refused(capsys, runs, "export", base, base, needles=["output", "being exported"])
    assert_refused(capsys, runs, "export", step, base / "checkpoints", needles=["output", "being exported"])
    assert_refused(capsys, runs, "export", base, runs, needles=["being exported"])
    assert_refused(capsys, runs, "export", base, runs / "d.zarr", needles=["not a checkpoint directory"])
    assert_refused(capsys, runs, "export", base, runs / "d.zarr" / ".zgroup", needles=["not a directory"])
    assert_refused(capsys, runs, "export", runs / "nothing", runs / "exported", needles=["not found"])
    assert run_cli(capsys, "export", base, runs / "exported")[0] == 0  # a new folder, then over its own older copy
    assert run_cli(capsys, "export", base, runs / "exported", "--dtype", "float32")[0] == 0


def test_the_limits_themselves_pass(tiny_runs, tmp_path):
    """The boundary values pass: steps = T, window = steps."""
    build_config("eval", [f"checkpoint={tiny_runs / 'base'}", "sampler=picard", "sampler.steps=100",
                          "sampler.window=100", f"output_dir={tmp_path}", "device=cpu"])
    build_config("train-pcm", [f"base={tiny_runs / 'base'}", "steps=100", "eval_window=100", f"output_dir={tmp_path}"])


@pytest.mark.parametrize("old,new,value", [("bases", "schedules", "[ddim2]"),
                                           ("episodes_bases", "episodes_schedules", "[ddim2]"),
                                           ("chunks_by_base.ddim2", "chunks_by_schedule.ddim2", "3")])
def test_renamed_bench_keys_still_work_with_a_warning(tiny_runs, tmp_path, capsys, old, new, value):
    """The schedule keys' old names (`bases`, ...) keep working for one release, with a one-line warning."""
    common = [f"checkpoint={tiny_runs / 'base'}", f"output_dir={tmp_path}", "device=cpu", "schedules=[ddim2]"]
    prefix = "+" if old.startswith("chunks_by_base.") else ""
    new_prefix = "+" if new.startswith("chunks_by_schedule.") else ""
    by_old = build_config("bench", [*common, f"{prefix}{old}={value}"])
    warning = capsys.readouterr().err
    assert warning.strip() == f"pcm: warning: {old.split('.')[0]} is deprecated and will be removed in the next " \
                              f"release; use {new.split('.')[0]}"
    by_new = build_config("bench", [*common, f"{new_prefix}{new}={value}"])
    assert by_old == by_new and capsys.readouterr().err == ""
