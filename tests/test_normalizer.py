import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pcm_policy.data.normalizer import Normalizer


def _data(seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-5, 300, (200, 4)).astype(np.float32)
    obs[:, 2] = 7.0  # a constant dim
    return {"obs": obs, "action": rng.normal(3.0, 2.0, (50, 8, 2)).astype(np.float32)}


def test_limits_maps_min_max_to_minus_one_one_per_dim():
    data = _data()
    n = Normalizer.fit(data, mode="limits")
    y = n.normalize("obs", torch.from_numpy(data["obs"]))
    np.testing.assert_allclose(y.min(0).values.numpy()[[0, 1, 3]], -1.0, atol=1e-6)
    np.testing.assert_allclose(y.max(0).values.numpy()[[0, 1, 3]], 1.0, atol=1e-6)
    # constant dim: scale 1, the constant lands at the middle of the range instead of blowing up
    assert n.params["obs"]["scale"][2].item() == 1.0
    np.testing.assert_allclose(y[:, 2].numpy(), 0.0, atol=1e-6)
    z = n.normalize("obs", torch.tensor([[0.0, 0.0, 7.5, 0.0]]))
    assert z[0, 2].item() == pytest.approx(0.5)
    # statistics over all leading dims of (N, T, D)
    a = n.normalize("action", torch.from_numpy(data["action"]))
    assert a.shape == (50, 8, 2)
    np.testing.assert_allclose(a.reshape(-1, 2).min(0).values.numpy(), -1.0, atol=1e-6)


def test_output_range_is_configurable():
    n = Normalizer.fit({"x": np.array([[2.0], [4.0], [3.0]])}, output_min=0.0, output_max=1.0)
    np.testing.assert_allclose(n.normalize("x", torch.tensor([[2.0], [4.0], [3.0]])).numpy().ravel(), [0, 1, 0.5])
    c = Normalizer.fit({"x": np.full((5, 1), 3.0)}, output_min=0.0, output_max=1.0)
    assert c.normalize("x", torch.tensor([[3.0]])).item() == pytest.approx(0.5)


def test_gaussian_and_identity():
    data = _data()
    g = Normalizer.fit(data, mode="gaussian")
    y = g.normalize("action", torch.from_numpy(data["action"])).reshape(-1, 2)
    np.testing.assert_allclose(y.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    yo = g.normalize("obs", torch.from_numpy(data["obs"]))
    assert torch.isfinite(yo).all() and yo[:, 2].abs().max() < 1e-5  # std 0 -> std treated as 1
    i = Normalizer.fit(data, mode={"obs": "identity", "action": "gaussian"})
    x = torch.from_numpy(data["obs"])
    assert torch.equal(i.normalize("obs", x), x)
    with pytest.raises(ValueError, match="mode"):
        Normalizer.fit(data, mode="minmax")


@pytest.mark.parametrize("mode", ["limits", "gaussian", "identity"])
def test_round_trip_any_leading_dims_dtype_device(mode):
    data = _data(1)
    n = Normalizer.fit(data, mode=mode)
    x = torch.from_numpy(data["action"]).double()
    y = n.normalize("action", x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(n.unnormalize("action", y), x, rtol=1e-6, atol=1e-5)
    x32 = torch.from_numpy(data["obs"])[None, :5]
    torch.testing.assert_close(n.unnormalize("obs", n.normalize("obs", x32)), x32, rtol=1e-6, atol=1e-4)


def test_numpy_input_returns_numpy_and_bad_inputs_raise():
    n = Normalizer.fit(_data())
    out = n.normalize("action", np.zeros((3, 2), np.float32))
    assert isinstance(out, np.ndarray) and out.shape == (3, 2)
    with pytest.raises(ValueError, match="2 dims"):
        n.normalize("action", torch.zeros(3, 5))
    with pytest.raises(KeyError, match="nope"):
        n.normalize("nope", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        Normalizer.fit({"x": np.array([[1.0], [np.nan]])})


def test_state_dict_names_and_safetensors_round_trip(tmp_path):
    data = _data(2)
    n = Normalizer.fit(data)
    sd = n.state_dict()
    assert {"normalizer.obs.scale", "normalizer.obs.offset", "normalizer.action.scale",
            "normalizer.action.offset"} <= set(sd)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    # saved beside model weights in one file; loading picks out its own keys
    save_file({**sd, "model.w": torch.ones(3)}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    m = Normalizer.from_state_dict(loaded)
    assert set(m.keys()) == {"obs", "action"}
    x = torch.from_numpy(data["obs"])
    assert torch.equal(m.normalize("obs", x), n.normalize("obs", x))
    assert torch.equal(m.unnormalize("action", torch.ones(4, 2)), n.unnormalize("action", torch.ones(4, 2)))
    empty = Normalizer()
    empty.load_state_dict(loaded)
    assert torch.equal(empty.normalize("obs", x), n.normalize("obs", x))


def test_load_state_dict_rejects_incomplete_fields():
    with pytest.raises(ValueError, match="scale/offset"):
        Normalizer.from_state_dict({"normalizer.obs.scale": torch.ones(2)})
