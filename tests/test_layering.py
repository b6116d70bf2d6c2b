"""The data flow of DESIGN.md in the imports: samplers know nothing of PCT, the policy, the controller or envs."""
import subprocess
import sys

import pytest

LAYERS = {
    # module: packages it must not pull in (directly or through anything it imports)
    "pcm_policy.sampling": ("pcm_policy.pcm", "pcm_policy.policy", "pcm_policy.control", "envs", "gymnasium"),
    "pcm_policy.control": ("pcm_policy.sampling", "pcm_policy.pcm", "envs"),
    "pcm_policy.policy": ("pcm_policy.pcm", "pcm_policy.control", "envs", "gymnasium"),
}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_module_does_not_import_higher_layers(module):
    code = (f"import sys, {module}; "
            f"print('\\n'.join(m for m in sys.modules if m.startswith({LAYERS[module]!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"{module} imports {out}"


def test_training_and_bench_paths_need_no_zarr_or_simulator():
    """The GPU image carries no zarr/numcodecs/gymnasium (scripts/gpu_check.sh): training on an hdf5 dataset, the
    validation of every command, and the bench must not import them (the PushT zarr reader imports zarr lazily)."""
    code = ("import sys; import pcm_policy.cli, pcm_policy.validation, pcm_policy.training, pcm_policy.bench, "
            "pcm_policy.pcm.training, pcm_policy.data.lowdim_dataset, pcm_policy.data.robomimic; "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('zarr', 'numcodecs', 'gymnasium')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"imports {sorted(set(m.split('.')[0] for m in out))}"
