"""The package's layers, read from its source: every module imports only modules of lower layers (or of its own
package), there is no import circle, function-level imports of the package's own modules are only the few that keep
optional dependencies off the training and bench paths, and those paths really load no zarr, gymnasium or
simulator (the GPU machine has none of them)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pcm_policy"

# Lowest first. A module may import modules of lower layers, and of its own package in the same layer.
LAYERS = [
    ["errors"],
    ["options", "paths", "atomic", "latency"],
    ["tasks", "runtime", "distributed"],
    ["config", "sampling", "model", "data", "control"],
    ["sampler_config"],
    ["chunk_sampler", "backends"],
    ["policy"],
    ["state_encoder"],
    ["checkpoint"],
    ["rollout", "interop"],
    ["observations", "training"],
    ["pcm"],
    ["benchmark"],
    ["auto_sampler"],
    ["serving"],
    ["commands"],
    ["cli"],
]

# Function-level imports of the package's own modules, each with its reason (optional dependencies only).
LAZY_IMPORTS = {
    ("pcm_policy.data.lowdim_dataset", "pcm_policy.data.replay_buffer"): "zarr only where a PushT buffer is read",
    ("pcm_policy.data.info", "pcm_policy.data.replay_buffer"): "zarr only where a zarr file is described",
    ("pcm_policy.data.image_dataset", "pcm_policy.data.replay_buffer"): "zarr only where a PushT buffer is read",
    ("pcm_policy.observations", "pcm_policy.rollout.visited"): "gymnasium only for closed-loop observations",
    ("pcm_policy.benchmark.studies", "pcm_policy.rollout.controlled"): "gymnasium only when the bench runs episodes",
    ("pcm_policy.commands.bench", "pcm_policy.rollout.env"): "gymnasium only when the bench runs episodes or "
                                                                "rollouts",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported package module, at module level) for every import statement of module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    found = []

    def target(node: ast.ImportFrom, alias: str) -> str:
        if node.level:
            base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return f"{module}.{alias}" if f"{module}.{alias}" in MODULES else module

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, False)
            elif isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((target(child, a.name), top) for a in child.names)
            else:
                visit(child, top)

    visit(tree, True)
    own = []
    for module, top in found:
        while module and module not in MODULES and "." in module:
            module = module.rsplit(".", 1)[0]
        if module in MODULES and module != name:
            own.append((module, top))
    return own


def _layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layering.py: place it")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "pcm_policy"))
def test_module_imports_only_lower_layers(name):
    own_package = name.rsplit(".", 1)[0] if name.count(".") > 1 else name
    for module, _ in _imports(name):
        same_package = module.startswith(own_package + ".") or module == own_package
        assert _layer(module) < _layer(name) or (same_package and _layer(module) == _layer(name)), \
            f"{name} (layer {_layer(name)}) imports {module} (layer {_layer(module)})"


def test_no_import_circle():
    """Module-level and function-level imports together form no cycle (a function-level import hides one from the
    interpreter, not from a reader)."""
    graph = {name: {m for m, _ in _imports(name)} for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 and not (nxt == "pcm_policy" or node.startswith(nxt + ".")):
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_function_level_imports_are_only_the_listed_optional_dependencies():
    lazy = {(name, module) for name in MODULES for module, top in _imports(name) if not top}
    assert lazy == set(LAZY_IMPORTS), f"unlisted: {sorted(lazy - set(LAZY_IMPORTS))}; gone: {sorted(set(LAZY_IMPORTS) - lazy)}"


@pytest.mark.parametrize("module,forbidden", [
    # the samplers know nothing of PCT, the policy, the controller or envs; the controller nothing of Picard
    ("pcm_policy.sampling", ("pcm_policy.pcm", "pcm_policy.policy", "pcm_policy.control", "envs", "gymnasium")),
    ("pcm_policy.control", ("pcm_policy.sampling", "pcm_policy.pcm", "envs")),
    ("pcm_policy.policy", ("pcm_policy.pcm", "pcm_policy.control", "envs", "gymnasium")),
    # the GPU machine carries no zarr, numcodecs, gymnasium, simulator or onnx(runtime): training on an hdf5 dataset,
    # every command's option checks but eval's, train-pcm and the bench must not load them (onnx loads only when
    # a graph is written or run: backend=onnx|auto, pcm export --format onnx)
    ("pcm_policy.cli, pcm_policy.commands.train, pcm_policy.commands.bench, pcm_policy.commands.train_pcm, "
     "pcm_policy.data.robomimic", ("zarr", "numcodecs", "gymnasium", "robosuite", "mujoco", "pymunk", "onnx")),
])
@pytest.mark.integration
def test_loaded_modules(module, forbidden):
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"{module} loads {sorted(set(m.split('.')[0] for m in out))}"
