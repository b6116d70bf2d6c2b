"""`pcm export --format diffusion-policy|lerobot` replaces only what pcm itself exported: a real Diffusion Policy
checkpoint, a real lerobot policy directory, or any other file at the output path is refused in one line naming
the path (exit 2) and left byte for byte as it was."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fixtures import assert_refused, run_cli
from pcm_policy.errors import ConfigError
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.export_marker import MARKER_FILE
from pcm_policy.interop.lerobot_export import export_lerobot
from pcm_policy.interop.safe_pickle import read_config

FIXTURES = Path(__file__).parent / "data" / "interop"
BASE = Path(__file__).parents[1] / "data" / "pusht" / "base"


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_diffusion_policy_checkpoint_is_never_replaced(capsys, tmp_path):
    theirs = tmp_path / "epoch=0100.ckpt"
    shutil.copy(FIXTURES / "dp_lowdim_pusht.ckpt", theirs)  # written by DP itself, another policy
    before = _digest(theirs)
    line = assert_refused(capsys, tmp_path, "export", BASE, theirs, "--format", "diffusion-policy",
                          needles=[str(theirs), "not an earlier pcm export"])
    assert "\n" not in line and _digest(theirs) == before
    # the same with the lerobot format aimed at it
    assert_refused(capsys, tmp_path, "export", BASE, theirs, "--format", "lerobot", needles=[str(theirs)])
    assert _digest(theirs) == before


def test_a_lerobot_directory_is_never_replaced(capsys, tmp_path):
    theirs = tmp_path / "pretrained_model"
    shutil.copytree(FIXTURES / "lerobot_pusht_keypoints", theirs)  # written by lerobot itself
    before = _digest(theirs)
    assert_refused(capsys, tmp_path, "export", BASE, theirs, "--format", "lerobot",
                   needles=[str(theirs), "not an earlier pcm export"])
    assert _digest(theirs) == before
    # a marker file that is not pcm's (another tool's, or a broken one) does not make it ours
    for text in ('{"exported_by": {"tool": "someone-else"}}', "not json", '["pcm-policy"]'):
        (theirs / MARKER_FILE).write_text(text)
        with pytest.raises(ConfigError, match="not an earlier pcm export"):
            export_lerobot(BASE, theirs)
    assert {k: v for k, v in _digest(theirs).items() if MARKER_FILE not in k} == before


@pytest.mark.parametrize("fmt", ["diffusion-policy", "lerobot"])
def test_other_files_are_refused(capsys, tmp_path, fmt):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("my notes")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("not weights")
    for target in (notes, folder):
        before = _digest(target)
        assert_refused(capsys, tmp_path, "export", BASE, target, "--format", fmt, needles=[str(target)])
        assert _digest(target) == before


def test_a_dp_checkpoint_marked_in_an_unresolved_interpolation_is_not_ours(tmp_path):
    """The mark is read without resolving anything: an interpolation in its place is not pcm's mark."""
    import torch
    from omegaconf import OmegaConf

    from pcm_policy.interop.safe_pickle import load_restricted

    payload = load_restricted(FIXTURES / "dp_lowdim_pusht.ckpt")
    OmegaConf.update(payload["cfg"], "exported_by", {"tool": "${oc.env:PCM_TOOL_NAME}"}, force_add=True)
    path = tmp_path / "marked.ckpt"
    torch.save(payload, path)
    before = _digest(path)
    with pytest.raises(ConfigError, match="not an earlier pcm export"):
        export_diffusion_policy(BASE, path)
    assert _digest(path) == before


def test_pcms_own_exports_are_replaced_without_a_flag(capsys, tmp_path):
    dp, lr = tmp_path / "base.ckpt", tmp_path / "lerobot"
    for _ in range(2):
        assert run_cli(capsys, "export", BASE, dp, "--format", "diffusion-policy")[0] == 0
        assert run_cli(capsys, "export", BASE, lr, "--format", "lerobot")[0] == 0
    assert read_config(dp)["exported_by"]["tool"] == "pcm-policy"
    mark = json.loads((lr / MARKER_FILE).read_text())
    assert mark["exported_by"]["tool"] == "pcm-policy" and mark["exported_by"]["checkpoint"].endswith("base")
    # an export of one format is not the other's: the paths were taken
    assert_refused(capsys, tmp_path, "export", BASE, dp, "--format", "lerobot", needles=[str(dp)])
    assert_refused(capsys, tmp_path, "export", BASE, lr, "--format", "diffusion-policy", needles=[str(lr)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.ckpt", "lerobot"]  # no temporaries left


def test_a_symlink_at_the_output_is_refused(capsys, tmp_path):
    real = export_diffusion_policy(BASE, tmp_path / "real.ckpt")
    link = tmp_path / "latest.ckpt"
    link.symlink_to(real)
    assert_refused(capsys, tmp_path, "export", BASE, link, "--format", "diffusion-policy", needles=[str(link)])
    assert link.is_symlink()
