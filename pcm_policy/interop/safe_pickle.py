"""Load a `torch.save` payload that holds tensors, plain containers and OmegaConf configs - and nothing else.

Diffusion Policy's workspace checkpoints are `torch.save(payload, f, pickle_module=dill)` with an OmegaConf
`cfg` inside, so torch's `weights_only` loader refuses them and a plain `torch.load` would run whatever the file
asks for. This module hands `torch.load` a pickle module whose `Unpickler` resolves only an allowlist of globals:

* torch's tensor rebuild functions (storages are resolved by torch itself) and `torch.Size`/`torch.device`;
* `collections.OrderedDict` / `defaultdict`, `_codecs.encode` (how protocol-2 pickles store bytes), a few
  builtin types, `typing.Any`;
* OmegaConf's config classes (`DictConfig`, `ListConfig`, their metadata and value nodes);
* dill's `_load_type` - the one dill helper such a stream uses (it names a builtin type, e.g. `dict`, for
  OmegaConf's metadata) - replaced by a lookup among the same builtin types, so dill is not needed.

Anything else (functions, dill's code/function builders, classes of other packages) is refused with
`UnsafeGlobal`, which the caller turns into a one-line `CheckpointError`. The stream's BUILD opcode (set an
object's state: `__setstate__` or its `__dict__`) is allowed only on the types whose pickles use it - OmegaConf's
configs, metadata and nodes, and `OrderedDict` (a state dict's `_metadata` only); on any other object (a `torch.device`,
a builtin container, ...) it is refused the same way. The pure-Python unpickler is used, as its opcodes can be
checked one by one (the payload's pickle is small: the tensors' bytes are read by torch).
"""
from __future__ import annotations

import builtins
import collections
import pickle
import typing
from pathlib import Path
from typing import Any

import torch

from pcm_policy.errors import CheckpointError

_BUILTIN_TYPES = {name: getattr(builtins, name) for name in (
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool",
    "slice", "range")}
_BUILTIN_TYPES["NoneType"] = type(None)


class UnsafeGlobal(pickle.UnpicklingError):
    """The stream references a global outside the allowlist (`.module`, `.name`)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


def _load_type(name: str) -> type:
    """Stand-in for `dill._dill._load_type`: only builtin container and scalar types."""
    if name not in _BUILTIN_TYPES:
        raise UnsafeGlobal("dill._dill._load_type", repr(name))
    return _BUILTIN_TYPES[name]


def _allowlist() -> dict[tuple[str, str], Any]:
    import omegaconf
    from omegaconf import base, nodes

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("_codecs", "encode"): __import__("_codecs").encode,
        ("typing", "Any"): typing.Any,
        ("dill._dill", "_load_type"): _load_type,
        ("dill.dill", "_load_type"): _load_type,  # dill < 0.3 named its module dill.dill
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("omegaconf.dictconfig", "DictConfig"): omegaconf.DictConfig,
        ("omegaconf.listconfig", "ListConfig"): omegaconf.ListConfig,
        ("omegaconf.base", "Metadata"): base.Metadata,
        ("omegaconf.base", "ContainerMetadata"): base.ContainerMetadata,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode",
                 "InterpolationResultNode"):
        if hasattr(nodes, name):
            allowed[("omegaconf.nodes", name)] = getattr(nodes, name)
    for name, typ in _BUILTIN_TYPES.items():
        allowed[("builtins", name)] = typ
    return allowed


def _build_types() -> frozenset[type]:
    """The types whose pickled state a stream may set (BUILD): OmegaConf's config objects and OrderedDict."""
    import omegaconf
    from omegaconf import base, nodes

    types = {collections.OrderedDict, omegaconf.DictConfig, omegaconf.ListConfig, base.Metadata,
             base.ContainerMetadata}
    types.update(getattr(nodes, name) for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                   "BooleanNode", "BytesNode", "PathNode", "InterpolationResultNode")
                 if hasattr(nodes, name))
    return frozenset(types)


class _RestrictedUnpickler(pickle._Unpickler):
    _allowed: dict[tuple[str, str], Any] = {}
    _build_allowed: frozenset[type] = frozenset()
    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        """BUILD on the allowed types only (see the module)."""
        inst, state = self.stack[-2], self.stack[-1]
        if type(inst) not in self._build_allowed:
            raise UnsafeGlobal(type(inst).__module__, f"{type(inst).__qualname__} (setting its state)")
        if type(inst) is collections.OrderedDict and not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise UnsafeGlobal("collections", "OrderedDict (setting attributes other than a state dict's _metadata)")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        import _compat_pickle

        # Protocol-2 streams (torch.save's default) name builtins the Python 2 way, e.g. int as __builtin__.long;
        # map them back as pickle's own find_class does (fix_imports). Python 3 names are not in these tables.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeGlobal(module, name) from None


class _PickleModule:
    """What `torch.load(pickle_module=...)` needs: `Unpickler` (it subclasses it for storages) and `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_restricted(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` of `path` on the CPU, resolving only the allowlisted globals (see the module docstring).

    Args:
        path: a `torch.save` file (zip or legacy format).
        mmap: map the tensors' bytes instead of reading them (zip format only), for a caller that reads only the
            non-tensor part.

    Returns:
        The unpickled payload.

    Raises:
        CheckpointError: a missing file, a truncated or corrupt one, or a global outside the allowlist (one line
            naming the file and the global).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    _RestrictedUnpickler._allowed = _allowlist()
    _RestrictedUnpickler._build_allowed = _build_types()
    try:
        # weights_only=False is safe here: every global goes through _RestrictedUnpickler.find_class.
        return torch.load(path, map_location="cpu", pickle_module=_PickleModule, weights_only=False, mmap=mmap)
    except UnsafeGlobal as e:
        raise CheckpointError(f"{path}: refusing to load global {e.module}.{e.name} (a Diffusion Policy "
                              "checkpoint needs only tensors, containers and OmegaConf configs)") from None
    except Exception as e:  # zip/pickle/EOF errors of a truncated or corrupt file come in many types
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}"
                              f"{': ' + detail if detail else ''})") from None


def read_config(path: str | Path) -> dict[str, Any] | None:
    """The `cfg` of a Diffusion Policy-style `.ckpt` as plain containers, interpolations left unresolved (nothing
    is run or looked up), or None when `path` is not such a file (unreadable, unsafe, another layout)."""
    try:
        payload = load_restricted(path, mmap=True)
        from omegaconf import DictConfig, OmegaConf

        cfg = payload.get("cfg") if isinstance(payload, dict) else None
        return OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else None
    except Exception:  # CheckpointError, or an odd config: not a file this tool wrote
        return None
