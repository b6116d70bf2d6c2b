"""Crafted Diffusion Policy checkpoints run nothing and leak nothing.

Each payload is real: the test first shows that the ordinary way of reading it (plain `torch.load`, OmegaConf's
own resolution with DP's `eval` resolver registered) does create the file or read the variable; then that
`pcm import diffusion-policy` refuses it in one line, the file never appears and the value is nowhere in stdout,
stderr or the output directory.
"""
import collections
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.basecontainer import BaseContainer

from fixtures import run_cli
from pcm_policy.errors import CheckpointError
from pcm_policy.interop import import_diffusion_policy
from pcm_policy.interop.safe_config import safe_eval
from pcm_policy.interop.safe_pickle import load_restricted

DATA = Path(__file__).parent / "data" / "interop"
SECRET = "pcm-test-secret-7f3a9c"


class _CreatesFile:
    """Unpickling it opens `path` for writing (creates the file) - what a `__reduce__` payload does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _payload_with(tmp_path, name, edit) -> Path:
    payload = load_restricted(DATA / "dp_lowdim_pusht.ckpt")
    edit(payload)
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _import_refused(capsys, tmp_path, ckpt: Path, *needles) -> str:
    """`pcm import diffusion-policy ckpt`: exit 2, one line naming the file (and the needles), nothing written,
    the secret nowhere in what it printed."""
    from pcm_policy.cli import main

    out = tmp_path / "imported"
    code = main(["import", "diffusion-policy", str(ckpt), f"output_dir={out}"])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("pcm: error: ") and str(ckpt) in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    assert SECRET not in captured.out + captured.err
    assert not out.exists()
    return err[0]


@pytest.fixture
def python_eval_registered():
    """Python's `eval` registered as OmegaConf's `eval` resolver, as DP's modules do on import; restored after."""
    previous = BaseContainer._resolvers.get("eval")
    OmegaConf.register_new_resolver("eval", eval, replace=True)
    yield
    if previous is None:
        OmegaConf.clear_resolver("eval")
    else:
        BaseContainer._resolvers["eval"] = previous


def test_reduce_payload_never_runs(capsys, tmp_path):
    live, bait = tmp_path / "created_by_torch_load", tmp_path / "created_by_pcm"
    real = _payload_with(tmp_path, "live.ckpt", lambda p: p["pickles"].__setitem__("x", _CreatesFile(live)))
    torch.load(real, weights_only=False)  # the ordinary loader runs it
    assert live.exists()
    crafted = _payload_with(tmp_path, "crafted.ckpt", lambda p: p["pickles"].__setitem__("x", _CreatesFile(bait)))
    _import_refused(capsys, tmp_path, crafted, "refusing to load global io.open")
    assert not bait.exists()


def test_build_is_refused_outside_the_types_that_need_it(tmp_path):
    class SetsState:
        def __reduce__(self):
            return (collections.defaultdict, (), {"note": "x"})

    class SetsOrderedDictAttr:
        def __reduce__(self):
            return (collections.OrderedDict, (), {"__class__": "x"})

    for i, obj in enumerate((SetsState(), SetsOrderedDictAttr())):
        path = _payload_with(tmp_path, f"build{i}.ckpt", lambda p: p["pickles"].__setitem__("x", obj))
        with pytest.raises(CheckpointError, match="setting"):
            import_diffusion_policy(path)
    # DP's own files use BUILD on OmegaConf objects and state dicts' OrderedDict._metadata: still read
    assert import_diffusion_policy(DATA / "dp_lowdim_pusht.ckpt").card["task"] == "pusht"


def _eval_payload(marker: Path) -> str:
    return "${eval:'__import__(\"pathlib\").Path(r\"" + str(marker) + "\").touch() or \"pusht_lowdim\"'}"


def test_eval_payload_never_runs_while_pythons_eval_is_registered(capsys, tmp_path, python_eval_registered):
    live, bait = tmp_path / "created_by_omegaconf", tmp_path / "created_by_pcm"
    cfg = OmegaConf.create({"task": {"name": _eval_payload(live)}})
    assert OmegaConf.to_container(cfg, resolve=True)["task"]["name"] == "pusht_lowdim"  # DP's resolution runs it
    assert live.exists()
    for key in ("task.name", "policy.horizon", "n_latency_steps"):
        crafted = _payload_with(tmp_path, "eval.ckpt",
                                lambda p: OmegaConf.update(p["cfg"], key, _eval_payload(bait), force_add=True))
        _import_refused(capsys, tmp_path, crafted, f"cfg.{key}")
        assert not bait.exists()
    assert BaseContainer._resolvers["eval"] is not None  # the process's registry is left as it was


def test_oc_env_never_resolves(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PCM_TEST_TOKEN", SECRET)
    assert OmegaConf.create({"a": "${oc.env:PCM_TEST_TOKEN}"}).a == SECRET  # OmegaConf's resolution reads it
    crafted = _payload_with(tmp_path, "env.ckpt", lambda p: OmegaConf.update(
        p["cfg"], "task.name", "${oc.env:PCM_TEST_TOKEN}", force_add=True))
    _import_refused(capsys, tmp_path, crafted, "cfg.task.name", "oc.env")
    # nor any other resolver, nor an environment variable hidden in a section the import does not read
    crafted = _payload_with(tmp_path, "env2.ckpt", lambda p: OmegaConf.update(
        p["cfg"], "task.name", "${oc.decode:'pusht_lowdim'}", force_add=True))
    _import_refused(capsys, tmp_path, crafted, "oc.decode")
    quiet = _payload_with(tmp_path, "env3.ckpt", lambda p: OmegaConf.update(
        p["cfg"], "logging.name", "${oc.env:PCM_TEST_TOKEN}", force_add=True))
    out = tmp_path / "ok"
    code, err = run_cli(capsys, "import", "diffusion-policy", quiet, f"output_dir={out}")
    assert code == 0, err
    assert not any(SECRET.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_dps_own_interpolations_still_resolve(tmp_path):
    """An unresolved DP config (as its yaml has it) resolves with our resolvers: key references and arithmetic."""
    def edit(p):
        OmegaConf.update(p["cfg"], "policy.n_action_steps", "${eval:'${n_action_steps}+${n_latency_steps}'}")
        OmegaConf.update(p["cfg"], "policy.model.global_cond_dim",
                         "${eval: ${obs_dim}*${n_obs_steps} if ${obs_as_global_cond} else None}")
        OmegaConf.update(p["cfg"], "task_name", "${task.name}", force_add=True)
    imported = import_diffusion_policy(_payload_with(tmp_path, "dp_style.ckpt", edit))
    reference = import_diffusion_policy(DATA / "dp_lowdim_pusht.ckpt")
    assert imported.config == reference.config and imported.card["task"] == "pusht"
    cyclic = _payload_with(tmp_path, "cycle.ckpt", lambda p: OmegaConf.update(p["cfg"], "horizon", "${horizon}"))
    with pytest.raises(CheckpointError, match="cyclic"):
        import_diffusion_policy(cyclic)


@pytest.mark.parametrize("expr", ["'x' * 99999999999", "99999999999 * 'x'", "9**9**9", "2 ** 1000",
                                  "'%0999999999d' % 1", "10**18 * 10**18", "'ab' * 6000", "1 / 0",
                                  "(" * 300 + "1" + ")" * 300, "1" + "+1" * 600, "[1] * 10", "x", "len('a')",
                                  "().__class__"])
def test_safe_eval_refuses_unbounded_or_foreign_work(expr):
    with pytest.raises(ValueError):
        safe_eval(expr)


def test_safe_eval_keeps_dps_arithmetic():
    assert safe_eval("2 if True or False else 20") == 2
    assert safe_eval("20*2") == 40 and safe_eval("'8'+'0'") == "80" and safe_eval("2 ** 10") == 1024
    assert safe_eval("500 if \"ph\" == \"mh\" else 400") == 400 and safe_eval("8+0") == 8
    assert safe_eval("'ab' * 3") == "ababab" and safe_eval("None") is None


def test_pickle_stream_cannot_name_the_unpickler(tmp_path):
    """A stream naming the loader's own modules (to swap its tables) is refused like any global."""
    path = tmp_path / "self.ckpt"
    torch.save({"cfg": None, "x": pickle.Unpickler}, path)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        load_restricted(path)
    assert os.path.exists(path)
