"""The `pcm` command line: help for every subcommand, JSON data info, one-line errors with a non-zero exit."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.fixtures import pusht_arrays, write_pusht_zarr

pytestmark = pytest.mark.integration  # real `pcm` processes, as a user runs them

SUBCOMMANDS = ["data", "train", "eval", "collect", "train-pcm", "bench", "demo", "export", "import"]


def pcm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pcm_policy.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_for_every_subcommand(capsys):
    from pcm_policy.cli import main

    top = pcm("--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: pcm ")
    for name in SUBCOMMANDS:
        assert name in top.stdout
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith(f"usage: pcm {name} "), out
        if name == "data":
            assert "info" in out and "summarise a PushT zarr or robomimic hdf5" in out
        elif name == "export":
            assert "--dtype {float16,bfloat16,float32}" in out and "checkpoint" in out and "output" in out
        elif name == "import":
            assert "{diffusion-policy,lerobot}" in out and "configs/import_policy.yaml" in out
        else:  # Hydra-override commands list their common keys and the config they override
            config = name.replace("-", "_")
            assert "Common overrides:" in out and "--print-config" in out and f"configs/{config}.yaml" in out


def test_print_config_applies_overrides():
    result = pcm("bench", "--print-config", "chunks=7", "schedules=[ddim10]", "task=lift")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["chunks"] == 7 and cfg["schedules"] == ["ddim10"] and cfg["task"]["name"] == "lift"
    assert cfg["control_hz"] == cfg["task"]["control_hz"]  # interpolations are resolved


def _here(capsys, *args) -> tuple[int, str, list[str]]:
    """`pcm ARGS` in this process, through the same `main` as the `pcm` script: (exit status, stdout, non-empty
    stderr lines). The real-process tests above and below cover the script itself."""
    from pcm_policy.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _one_line_error(result, *needles) -> None:
    code, _, err = result
    assert code == 2 and len(err) == 1 and err[0].startswith("pcm: error: "), (code, err)
    for needle in needles:
        assert needle in err[0], err[0]


def test_data_info_json_for_both_formats(capsys, pusht_zarr_dir, pusht_zarr_zip, robomimic_hdf5):
    for path, fmt in [(pusht_zarr_dir, "zarr"), (pusht_zarr_zip, "zarr"), (robomimic_hdf5, "robomimic")]:
        code, out, err = _here(capsys, "data", "info", path, "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["format"] == fmt and info["episodes"] > 0 and info["steps"] > 0 and info["arrays"]
    info = json.loads(_here(capsys, "data", "info", robomimic_hdf5, "--json")[1])
    assert "actions" in info["arrays"] and any(k.startswith("obs/") for k in info["arrays"])


def test_data_info_bad_inputs(capsys, tmp_path):
    _one_line_error(_here(capsys, "data", "info", tmp_path / "missing.zarr", "--json"), "missing.zarr")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage" * 10)
    _one_line_error(_here(capsys, "data", "info", junk), "junk.bin")
    arrays = pusht_arrays()
    arrays["episode_ends"] = np.array([12, 21, 36, 400])
    bad = write_pusht_zarr(tmp_path / "ends.zarr", arrays=arrays)
    _one_line_error(_here(capsys, "data", "info", bad), "ends.zarr", "episode_ends")
    nodata = tmp_path / "nodata.hdf5"
    with h5py.File(nodata, "w") as f:
        f.create_group("mask")
    _one_line_error(_here(capsys, "data", "info", nodata), "nodata.hdf5", "data")


def test_unknown_key_in_a_real_process():
    assert_one_line_error(pcm("train", "train.stepz=3"), "train.stepz")


def test_unknown_task_missing_dataset_and_bad_device(capsys, tmp_path, pusht_zarr_dir):
    _one_line_error(_here(capsys, "train", "task=nope"), "task/nope")
    _one_line_error(_here(capsys, "train", f"dataset.path={tmp_path / 'none.zarr'}", f"output_dir={tmp_path / 'o'}"),
                    "none.zarr")
    _one_line_error(_here(capsys, "train", f"dataset.path={pusht_zarr_dir}", "device=cuda:3",
                          f"output_dir={tmp_path / 'o'}"), "device")
    assert not (tmp_path / "o").exists()


def test_eval_and_pcm_need_checkpoints(capsys, tmp_path):
    _one_line_error(_here(capsys, "eval", f"output_dir={tmp_path / 'e'}"), "checkpoint")
    _one_line_error(_here(capsys, "eval", f"checkpoint={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'e'}"),
                    "nothing")
    _one_line_error(_here(capsys, "train-pcm", f"output_dir={tmp_path / 'p'}"), "base")


def test_deterministic_flag(tmp_path):
    """deterministic=true sets up deterministic CUDA kernels; on a CPU it runs and changes nothing."""
    code = ("import os, torch; from pcm_policy.runtime import set_deterministic; assert set_deterministic('1'); "
            "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.are_deterministic_algorithms_enabled(), "
            "torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [":4096:8", "True", "False", "True"], out.stderr

    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    losses = []
    for flag in ("false", "true"):
        run = tmp_path / flag
        result = pcm("train", f"dataset.path={data}", f"output_dir={run}", "device=cpu", f"deterministic={flag}",
                     "train.steps=3", "train.checkpoint_every=3", "train.batch_size=8", "train.log_every=1",
                     "train.warmup_steps=0", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32",
                     "policy.n_groups=4", "threads=1")
        assert result.returncode == 0, result.stderr[-2000:]
        losses.append([json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()
                       if '"loss"' in line])
    assert losses[0] == losses[1] and len(losses[0]) == 3
