"""Everything pcm writes gets the modes any tool's files get under the user's umask (0666 / 0777 less the umask):
a server running as another user, a shared lab machine or a container volume can read the weights as it can read
the card beside them - safetensors and temporary names alone would leave them 0600. A write the machine refuses
is one line naming the file, exit 2."""
import errno
import os
import stat
from pathlib import Path

import pytest

from fixtures import assert_refused

from pcm_policy.atomic import atomic_path, atomic_write_text
from pcm_policy.checkpoint import export_checkpoint
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.lerobot_export import export_lerobot

BASE = Path(__file__).parents[1] / "data" / "pusht" / "base"


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in entries}


def _expected(root: Path, mask: int) -> dict[str, int]:
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): (0o777 if p.is_dir() else 0o666) & ~mask for p in entries}


def test_everything_written_follows_the_umask(umask, tmp_path):
    outputs = [
        export_lerobot(BASE, tmp_path / "lerobot")["path"],
        export_diffusion_policy(BASE, tmp_path / "base.ckpt"),
        export_checkpoint(BASE, tmp_path / "nested" / "fp16"),  # safetensors' own 0600 files inside
    ]
    atomic_write_text(tmp_path / "metrics.json", "{}")
    outputs.append(tmp_path / "metrics.json")
    with atomic_path(tmp_path / "dataset") as tmp:  # a directory tree a writer builds with its own modes
        (tmp / "sub").mkdir(parents=True, mode=0o700)
        (tmp / "sub" / "arr").write_bytes(b"x")
        os.chmod(tmp / "sub" / "arr", 0o600)
    outputs.append(tmp_path / "dataset")
    for out in outputs:
        assert _modes(out) == _expected(out, umask), out
    assert stat.S_IMODE((tmp_path / "nested").stat().st_mode) == 0o777 & ~umask  # created parents too


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    """An OSError while writing (here a full disk, as `os.fsync` and safetensors report it) reaches the user as
    one line naming the file, exit 2, and leaves nothing behind."""
    from safetensors import SafetensorError

    import pcm_policy.interop.lerobot_export as lerobot_export

    monkeypatch.setattr(os, "fsync", _no_space)
    assert_refused(capsys, tmp_path, "export", BASE, tmp_path / "base.ckpt", "--format", "diffusion-policy",
                   needles=["No space left on device", "base.ckpt"])
    monkeypatch.undo()

    def full(tensors, path, *args, **kwargs):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{path}"')
    monkeypatch.setattr(lerobot_export, "save_file", full)
    assert_refused(capsys, tmp_path, "export", BASE, tmp_path / "lerobot", "--format", "lerobot",
                   needles=["No space left on device", str(tmp_path / "lerobot")])
