"""Model switching (output space and LoRA weight space) returns exactly the base model's sequential sample."""

import copy

import pytest
import torch

from pcm_policy.model.lora import add_lora, lora_parameters, scaled_denoiser
from pcm_policy.sampling import sample_lora_switched, sample_picard, sample_sequential, sample_switched, switch_lambda

from tests.toys import DA, H, Recorder, Toy, diffusers_reference, draw, make_scheduler


CONFIGS = [(k, S, p, c) for k, S in [("ddpm", 100), ("ddim", 10), ("ddim", 16)]
           for p in ("epsilon", "sample") for c in (False, True)]


def _id(c):
    return f"{c[0]}{c[1]}-{c[2]}-{'clip' if c[3] else 'noclip'}"


def test_lambda_schedule():
    assert [switch_lambda(k, 50, 100) for k in range(4)] == [1.0, 0.5, 0.0, 0.0]
    assert switch_lambda(3, 10, 100) == pytest.approx(0.7)
    assert switch_lambda(0, 1e9, 10) == 1.0 and switch_lambda(1, 1e9, 10) == 0.0


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("window,B,use_cond", [(None, 1, False), (None, 2, True), (5, 2, True)])
def test_output_switching_exact_with_bad_pcm(cfg, window, B, use_cond):
    kind, S, pred, clip = cfg
    sch = make_scheduler(kind, S, pred, clip)
    base, bad_pcm = Toy(seed=1), Toy(seed=99, gain=5.0)
    x_T, noise, cond = draw(S, B, seed=3)
    cond = cond if use_cond else None
    ref = diffusers_reference(base, sch, x_T, cond, 3)
    out, st = sample_switched(base, bad_pcm, sch, x_T, noise, cond, stiffness=S / 3, window=window, tol=0.0)
    assert st.converged and st.lambdas[-1] == 0.0 and st.lambdas[:2] == [1.0, pytest.approx(2 / 3)]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("window,B,use_cond", [(None, 2, True), (6, 1, False)])
def test_lora_switching_exact(cfg, window, B, use_cond):
    kind, S, pred, clip = cfg
    sch = make_scheduler(kind, S, pred, clip)
    base = Toy(seed=1)
    lora = add_lora(copy.deepcopy(base), rank=2)
    with torch.no_grad():
        for p in lora_parameters(lora):
            p.copy_(torch.randn_like(p))  # a large random nonzero delta
    x_T, noise, cond = draw(S, B, seed=4)
    cond = cond if use_cond else None
    ref = diffusers_reference(base, sch, x_T, cond, 4)
    out, st = sample_lora_switched(scaled_denoiser(lora), sch, x_T, noise, cond, window=window, tol=0.0)
    assert st.converged and st.lambdas[:3] == [1.0, 0.0, 0.0]  # default stiffness S: one PCM step
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("window", [None, 6])
def test_output_switching_counts_and_shapes(window):
    S, B = 16, 2
    sch = make_scheduler("ddim", S)
    base, pcm = Recorder(Toy(seed=1)), Recorder(Toy(seed=2))
    x_T, noise, cond = draw(S, B)
    out, st = sample_switched(base, pcm, sch, x_T, noise, cond, stiffness=4.0, window=window, tol=1e-8)
    w = S if window is None else window
    assert len(set(base.shapes + pcm.shapes)) == 1 and base.shapes[0][0] == (w * B, H, DA)
    assert st.lambdas[:5] == [1.0, 0.75, 0.5, 0.25, 0.0] and len(st.lambdas) == st.iterations
    # lambda = 1: PCM only; 0 < lambda < 1: both; lambda = 0: base only
    assert len(pcm.shapes) == 4 and len(base.shapes) == st.iterations - 1
    assert st.network_calls == len(pcm.shapes) + len(base.shapes)
    assert st.network_rows == st.network_calls * w * B
    assert all(isinstance(v, int) for v in (st.iterations, st.evaluations, st.network_calls))
    assert st.iterations <= 4 + S and st.converged


def test_lora_switching_one_call_per_iteration_with_lambda_scale():
    S, B = 10, 2
    sch = make_scheduler("ddim", S)
    lora = add_lora(Toy(seed=1), rank=2)
    rec = Recorder(scaled_denoiser(lora))
    x_T, noise, cond = draw(S, B)
    out, st = sample_lora_switched(rec, sch, x_T, noise, cond, stiffness=S / 3, tol=1e-8)
    assert len(rec.shapes) == st.iterations == st.network_calls and len(set(rec.shapes)) == 1
    assert [e[0] for e in rec.extra] == st.lambdas
    assert st.lambdas[:4] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]


def test_switching_stop_and_max_iters():
    S = 100
    sch = make_scheduler("ddpm", S)
    base, pcm = Toy(seed=1), Toy(seed=2)
    x_T, noise, cond = draw(S, 2)
    out, st = sample_switched(base, pcm, sch, x_T, noise, cond, should_stop=lambda: True)
    assert st.iterations == 1 and not st.converged and st.lambdas == [1.0]
    assert not torch.equal(out, x_T)
    out, st = sample_switched(base, pcm, sch, x_T, noise, cond, max_iters=2, tol=0.0)
    assert st.iterations == 2 and not st.converged
    lora = add_lora(Toy(seed=1), rank=2)
    out, st = sample_lora_switched(scaled_denoiser(lora), sch, x_T, noise, cond, should_stop=lambda: True)
    assert st.iterations == 1 and not st.converged


@pytest.mark.parametrize("space", ["output", "weight"])
def test_a_pcm_equal_to_the_base_costs_at_most_its_one_pcm_round(space):
    """Switching with a 'PCM' that is the base model itself (no clipping, so its map is the base map): the lambda = 1
    round is one base Picard round, so switching needs at most one round more than Picard and gives its output.
    (That a trained PCM needs FEWER rounds is tests/test_pct_toy.py.)"""
    S = 16
    sch = make_scheduler("ddim", S, clip=False)
    base = Toy(seed=1, gain=0.5)
    x_T, noise, cond = draw(S, 2)
    _, st_p = sample_picard(base, sch, x_T, noise, cond)
    if space == "output":
        out, st_s = sample_switched(base, base, sch, x_T, noise, cond)
    else:
        out, st_s = sample_lora_switched(lambda x, t, c, scale: base(x, t, c), sch, x_T, noise, cond)
    assert st_s.lambdas[:2] == [1.0, 0.0]
    assert st_p.iterations <= st_s.iterations <= st_p.iterations + 1
    ref = sample_sequential(base, sch, x_T, noise, cond)
    assert (out - ref).abs().max().item() < 0.05


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pcm_step_uses_the_unclipped_map(kind):
    """The first (lambda = 1) iteration is one Picard step of the PCM through the step WITHOUT x0 clipping,
    in both switching modes; with clipping the one-step targets from X^0 would be out of reach."""
    from pcm_policy.sampling import StepCoefficients, picard_step

    S = 10
    sch = make_scheduler(kind, S, "epsilon", clip=True)
    base = Toy(seed=1)
    lora = add_lora(copy.deepcopy(base), rank=2)
    with torch.no_grad():
        for p in lora_parameters(lora):
            p.copy_(torch.randn_like(p))
    x_T, noise, cond = draw(S, 2, seed=5)
    x_T = 3.0 * x_T  # far outside the clip range, so clipping would change the step
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    Y0 = x_T.unsqueeze(0).repeat(S + 1, 1, 1, 1)
    nt = coeffs.noise_terms(noise)
    pcm = lambda x, t, c: lora(x, t, c)  # noqa: E731  (the LoRA network at full scale)
    unclipped = picard_step(pcm, coeffs.unclipped(), Y0, nt, cond)[S]
    clipped = picard_step(pcm, coeffs, Y0, nt, cond)[S]
    assert (unclipped - clipped).abs().max() > 1e-3
    out, st = sample_switched(base, pcm, sch, x_T, noise, cond, max_iters=1)
    torch.testing.assert_close(out, unclipped, atol=1e-10, rtol=1e-10)
    out_w, _ = sample_lora_switched(scaled_denoiser(lora), sch, x_T, noise, cond, max_iters=1)
    torch.testing.assert_close(out_w, unclipped, atol=1e-10, rtol=1e-10)
    assert st.lambdas == [1.0] and not st.converged
