"""GaussianDiffusion: constants, the forward process, the loss, the samplers and the bound.

Two stand-in models keep these tests fast and exact: `Scale` (one parameter,
for the loss and repeatability) and `OptimalGaussianEps`, the exact noise
predictor for Gaussian data, against which the samplers and the bound have
answers known in closed form.
"""
import math

import numpy as np
import pytest
from scipy import stats

from autograd import Tensor
from tinyddpm.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, extract,
                                nats_to_bits_per_dim)
from tinyddpm.schedule import linear_betas

LEVELS = -1 + 2 * np.arange(256) / 255          # the 256-level data grid of [-1, 1]


def scaled_linear(T):
    """The paper's linear schedule stretched to T steps, so alpha_bar_T stays about 4e-5."""
    return linear_betas(T, 1e-4 * 1000 / T, 0.02 * 1000 / T)


class Scale:
    """A one-parameter stand-in for the UNet: eps_theta(x, t) = w x."""

    def __init__(self, w=0.5, dtype=np.float32):
        self.w = Tensor(np.array([w], dtype=dtype), requires_grad=True)

    def __call__(self, x, t):
        return x * self.w


class OptimalGaussianEps:
    """The best possible eps-predictor when every dimension of x_0 is N(mu, s^2).

    x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps and eps are jointly Gaussian, so
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
    `alphas_cumprod` is the original chain's: models get original timesteps.
    """

    def __init__(self, alphas_cumprod, mu, s):
        self.alphas_cumprod, self.mu, self.s = alphas_cumprod, mu, s
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(np.asarray(t).copy())
        ab = self.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        eps = np.sqrt(1 - ab) * (x.data - np.sqrt(ab) * self.mu) / (ab * self.s ** 2 + 1 - ab)
        return Tensor(eps.astype(x.dtype))


def gaussian_setup(T=1000, mu=0.1, s=0.3, variance="beta"):
    """A diffusion and the optimal model for data N(mu, s^2), well inside [-1, 1]."""
    diffusion = GaussianDiffusion(scaled_linear(T), variance)
    return diffusion, OptimalGaussianEps(diffusion.alphas_cumprod, mu, s)


def assert_gaussian(x, mu, s, std_rtol):
    """Sample mean within 5 standard errors of mu, sample std within std_rtol of s."""
    assert abs(x.mean() - mu) < 5 * s / math.sqrt(x.size), (x.mean(), mu)
    assert x.std() == pytest.approx(s, rel=std_rtol)


# =============================================================================
# Constants
# =============================================================================

@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_constants_match_their_formulas(variance):
    betas = linear_betas(20, 1e-3, 0.2)
    d = GaussianDiffusion(betas, variance)
    alpha_bar, expected = 1.0, {name: [] for name in [
        "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recip_alphas",
        "betas_over_sqrt_one_minus_alphas_cumprod"]}
    for beta in betas:
        alpha, alpha_bar_prev = 1 - beta, alpha_bar
        alpha_bar *= alpha
        for name, value in [
                ("alphas", alpha), ("alphas_cumprod", alpha_bar), ("alphas_cumprod_prev", alpha_bar_prev),
                ("sqrt_alphas_cumprod", math.sqrt(alpha_bar)),
                ("sqrt_one_minus_alphas_cumprod", math.sqrt(1 - alpha_bar)),
                ("sqrt_recip_alphas_cumprod", 1 / math.sqrt(alpha_bar)),
                ("sqrt_recipm1_alphas_cumprod", math.sqrt(1 / alpha_bar - 1)),
                ("posterior_variance", (1 - alpha_bar_prev) / (1 - alpha_bar) * beta),
                ("posterior_mean_coef1", math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)),
                ("posterior_mean_coef2", math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)),
                ("sqrt_recip_alphas", 1 / math.sqrt(alpha)),
                ("betas_over_sqrt_one_minus_alphas_cumprod", beta / math.sqrt(1 - alpha_bar))]:
            expected[name].append(value)
    for name, values in expected.items():
        table = getattr(d, name)
        assert table.dtype == np.float64, name
        np.testing.assert_allclose(table, values, rtol=1e-12, atol=1e-300, err_msg=name)
    pv = expected["posterior_variance"]
    # log of the posterior variance, clipped at t = 0 where the variance itself is 0
    assert pv[0] == 0.0
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([pv[1]] + pv[1:]), rtol=1e-12)
    model_variance = betas if variance == "beta" else pv
    np.testing.assert_allclose(d.model_variance, model_variance, rtol=1e-12)
    np.testing.assert_allclose(d.model_log_variance[1:], np.log(model_variance[1:]), rtol=1e-12)


def test_extract_indexes_reshapes_and_casts():
    d = GaussianDiffusion(linear_betas(20, 1e-3, 0.2))
    x = np.zeros((3, 1, 2, 2), dtype=np.float32)
    t = np.array([0, 5, 19])
    for like in (x, Tensor(x)):
        rows = extract(d.betas, t, like)
        assert rows.shape == (3, 1, 1, 1) and rows.dtype == np.float32 and isinstance(rows, np.ndarray)
        np.testing.assert_array_equal(rows.ravel(), d.betas[t].astype(np.float32))
    assert extract(d.betas, t, np.zeros(3)).shape == (3,)


def test_t0_is_the_papers_first_step():
    """0-based timesteps: t = 0 is the paper's t = 1, and t = T - 1 is t = T."""
    d = GaussianDiffusion(linear_betas())
    x = np.zeros((1, 1, 1, 1))
    assert extract(d.betas, np.array([0]), x).item() == 1e-4            # beta_1
    assert extract(d.betas, np.array([999]), x).item() == 0.02          # beta_T
    assert d.alphas_cumprod[0] == 1 - 1e-4 and d.alphas_cumprod_prev[0] == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(betas=[0.1, 1.0]), "betas"),
    (dict(betas=[0.0, 0.1]), "betas"),
    (dict(betas=[[0.1]]), "betas"),
    (dict(betas=[0.1], variance="learned"), "variance"),
])
def test_bad_arguments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(**bad)


# =============================================================================
# Forward process and posterior
# =============================================================================

@pytest.mark.parametrize("t", [0, 99, 500, 999])
def test_q_sample_has_the_closed_form_marginal(t):
    d = GaussianDiffusion(linear_betas())
    rng = np.random.default_rng(0)
    n, x0 = 200_000, np.array([[-0.8, 0.0, 0.6]])
    noise = rng.standard_normal((n, 3))
    x_t = d.q_sample(np.repeat(x0, n, axis=0), np.full(n, t), noise)
    ab = d.alphas_cumprod[t]
    std = math.sqrt(1 - ab)
    np.testing.assert_allclose(x_t.mean(0), math.sqrt(ab) * x0[0], atol=5 * std / math.sqrt(n))
    np.testing.assert_allclose(x_t.var(0), 1 - ab, rtol=0.02)


def test_q_sample_gives_the_same_on_tensors_and_arrays():
    d = GaussianDiffusion(linear_betas(50, 1e-3, 0.2))
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 4, 1, 3, 3), dtype=np.float32)
    t = np.array([0, 10, 30, 49])
    on_arrays = d.q_sample(x0, t, noise)
    on_tensors = d.q_sample(Tensor(x0), t, Tensor(noise))
    assert isinstance(on_tensors, Tensor) and on_arrays.dtype == np.float32
    np.testing.assert_array_equal(on_tensors.data, on_arrays)


@pytest.mark.parametrize("t", [1, 10, 300, 999])
def test_q_posterior_is_bayes_rule(t):
    """q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalized on a fine grid."""
    d = GaussianDiffusion(linear_betas())
    x0, x_t = 0.4, -0.3
    mean, var, log_var = d.q_posterior(np.array([x0]), np.array([x_t]), np.array([t]))
    ab_prev, beta = d.alphas_cumprod[t - 1], d.betas[t]
    grid = mean[0] + np.linspace(-12, 12, 200_001) * math.sqrt(var[0])
    log_density = (stats.norm.logpdf(x_t, math.sqrt(1 - beta) * grid, math.sqrt(beta))
                   + stats.norm.logpdf(grid, math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)))
    w = np.exp(log_density - log_density.max())
    w /= w.sum()
    bayes_mean = (w * grid).sum()
    bayes_var = (w * (grid - bayes_mean) ** 2).sum()
    assert mean[0] == pytest.approx(bayes_mean, abs=1e-9)
    assert var[0] == pytest.approx(bayes_var, rel=1e-6)
    assert log_var[0] == pytest.approx(math.log(bayes_var), abs=1e-6)


def test_q_posterior_at_t0_is_a_point_mass_at_x0():
    d = GaussianDiffusion(linear_betas())
    mean, var, log_var = d.q_posterior(np.array([0.7]), np.array([-0.2]), np.array([0]))
    assert mean[0] == pytest.approx(0.7, abs=1e-12) and var[0] == 0.0
    assert log_var[0] == math.log(d.posterior_variance[1])        # the clipped log


def test_predictions_invert_q_sample():
    d = GaussianDiffusion(linear_betas())
    rng = np.random.default_rng(2)
    x0, noise = rng.standard_normal((2, 5, 4))
    t = np.array([0, 1, 200, 700, 999])
    x_t = d.q_sample(x0, t, noise)
    np.testing.assert_allclose(d.predict_x0_from_eps(x_t, t, noise), x0, atol=1e-9)
    np.testing.assert_allclose(d.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-9)


# =============================================================================
# Loss (Algorithm 1)
# =============================================================================

def test_loss_is_float32_and_backpropagates_into_the_model():
    d = GaussianDiffusion(linear_betas(100, 1e-3, 0.2))
    model = Scale()
    x0 = np.random.default_rng(3).uniform(-1, 1, (4, 1, 5, 5)).astype(np.float32)
    loss = d.loss(model, x0, np.random.default_rng(7))
    assert isinstance(loss, Tensor) and loss.shape == () and loss.dtype == np.float32
    loss.backward()
    # The same draws by hand: t first, then the noise.
    rng = np.random.default_rng(7)
    t = rng.integers(0, 100, size=4)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = d.q_sample(x0, t, noise)
    residual = 0.5 * x_t - noise
    assert loss.item() == pytest.approx((residual ** 2).mean(), rel=1e-5)
    assert model.w.grad.shape == (1,)
    assert model.w.grad[0] == pytest.approx((2 * residual * x_t).mean(), rel=1e-4)


def test_min_snr_loss_weights_each_example_by_min_snr_gamma_over_snr():
    """Hang et al. 2023 for an eps model: example b's squared error counts min(SNR_t, gamma) / SNR_t."""
    d = GaussianDiffusion(linear_betas(100, 1e-3, 0.2))
    model = Scale(dtype=np.float64)
    x0 = np.random.default_rng(3).uniform(-1, 1, (6, 1, 4, 4))
    rng = np.random.default_rng(7)                  # the loss's own draws, by hand: t, then the noise
    t = rng.integers(0, 100, size=6)
    noise = rng.standard_normal(x0.shape)
    abar = np.cumprod(1 - np.linspace(1e-3, 0.2, 100))[t]
    x_t = np.sqrt(abar)[:, None, None, None] * x0 + np.sqrt(1 - abar)[:, None, None, None] * noise
    snr = abar / (1 - abar)
    gamma = float(np.median(snr))                   # some examples above it, some below
    weight = np.where(snr > gamma, gamma / snr, 1.0)
    loss = d.loss(model, x0, np.random.default_rng(7), min_snr_gamma=gamma)
    loss.backward()
    per_example = ((0.5 * x_t - noise) ** 2).mean(axis=(1, 2, 3))
    assert 0 < weight.min() < 1 and weight.max() == 1.0, "the draws should reach both sides of gamma"
    assert loss.item() == pytest.approx((weight * per_example).mean(), rel=1e-12)
    grad = (weight[:, None, None, None] * 2 * (0.5 * x_t - noise) * x_t).mean()
    assert model.w.grad[0] == pytest.approx(grad, rel=1e-10)


def test_min_snr_loss_with_gamma_above_every_snr_is_the_plain_loss():
    d = GaussianDiffusion(linear_betas(100, 1e-3, 0.2))
    x0 = np.random.default_rng(3).uniform(-1, 1, (4, 1, 5, 5))
    top = float((d.alphas_cumprod / (1 - d.alphas_cumprod)).max())
    plain = d.loss(Scale(dtype=np.float64), x0, np.random.default_rng(1)).item()
    weighted = d.loss(Scale(dtype=np.float64), x0, np.random.default_rng(1), min_snr_gamma=2 * top).item()
    assert weighted == pytest.approx(plain, rel=1e-14)


def test_loss_keeps_float64():
    d = GaussianDiffusion(linear_betas(10, 1e-3, 0.2))
    loss = d.loss(Scale(dtype=np.float64), np.zeros((2, 3)), np.random.default_rng(0))
    assert loss.dtype == np.float64


def test_a_model_of_the_wrong_shape_is_reported():
    d = GaussianDiffusion(linear_betas(10, 1e-3, 0.2))
    with pytest.raises(ValueError, match="shape"):
        d.loss(lambda x, t: x[0], np.zeros((2, 3), dtype=np.float32), np.random.default_rng(0))


# =============================================================================
# Ancestral sampling (Algorithm 2)
# =============================================================================

def test_p_sample_adds_no_noise_at_t0():
    """At t = 0 (the paper's t = 1) z = 0: the step returns the mean, whatever the rng draws."""
    d = GaussianDiffusion(linear_betas(50, 1e-3, 0.2))
    x_t = np.random.default_rng(0).uniform(-1, 1, (3, 1, 4, 4)).astype(np.float32)
    for t in (0, 1):
        steps = [d.p_sample(Scale(), x_t, np.full(3, t), np.random.default_rng(seed)) for seed in (1, 2)]
        mean = d.p_mean_variance(Scale(), x_t, np.full(3, t))[0]
        if t == 0:
            np.testing.assert_array_equal(steps[0], mean)
            np.testing.assert_array_equal(steps[1], mean)
        else:
            assert not np.allclose(steps[0], steps[1])


def test_sampling_with_a_fixed_seed_is_repeatable():
    d = GaussianDiffusion(linear_betas(50, 1e-3, 0.2))
    runs = [d.sample(Scale(), (2, 1, 4, 4), np.random.default_rng(seed)) for seed in (5, 5, 6)]
    assert runs[0].dtype == np.float32 and runs[0].shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert runs[0].min() >= -1 and runs[0].max() <= 1


def test_clipped_and_literal_means_agree_when_nothing_is_clipped():
    """clip_denoised=True takes the posterior mean of the clipped predicted x0; eq. 11 otherwise."""
    d, model = gaussian_setup(T=200, mu=0.0, s=0.2)
    inside = [d.sample(model, (500, 2), np.random.default_rng(0), clip_denoised=clip, dtype=np.float64)
              for clip in (True, False)]
    np.testing.assert_allclose(inside[0], inside[1], atol=1e-9)
    # Data far outside [-1, 1]: the predicted x0 is clipped, and the two differ.
    d, model = gaussian_setup(T=200, mu=0.0, s=3.0)
    outside = [d.p_mean_variance(model, np.full((1, 1), 2.0), np.array([10]), clip)[0]
               for clip in (True, False)]
    assert abs(outside[0] - outside[1]).item() > 1e-3


def test_ancestral_sampling_recovers_gaussian_data():
    d, model = gaussian_setup(T=1000, mu=0.1, s=0.3)
    x = d.sample(model, (10_000, 1), np.random.default_rng(0), clip_denoised=False, dtype=np.float64)
    assert_gaussian(x, 0.1, 0.3, std_rtol=0.03)


def test_trajectory_snapshots_and_progress():
    d = GaussianDiffusion(linear_betas(30, 1e-3, 0.3))
    ticks = []
    x, trajectory = d.sample(Scale(), (2, 3), np.random.default_rng(0), progress=lambda: ticks.append(1),
                             return_trajectory=True)
    assert len(ticks) == 30
    labels = [t for t, _ in trajectory]
    assert len(trajectory) == 11 and labels[0] == 30 and labels[-1] == 0 and labels == sorted(labels)[::-1]
    x_T = np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32)   # the sampler's first draw
    np.testing.assert_array_equal(trajectory[0][1], x_T)
    assert trajectory[-1][1] is x
    _, every_step = d.sample(Scale(), (2, 3), np.random.default_rng(0), return_trajectory=100)
    assert [t for t, _ in every_step] == list(range(30, -1, -1))


# =============================================================================
# Respacing and DDIM
# =============================================================================

def test_respacing_to_all_steps_reproduces_the_chain_bit_for_bit():
    d = GaussianDiffusion(linear_betas(100, 1e-3, 0.2))
    full = d.respace(100)
    np.testing.assert_array_equal(full.betas, d.betas)
    np.testing.assert_array_equal(full.timestep_map, np.arange(100))
    plain = d.sample(Scale(), (2, 1, 3, 3), np.random.default_rng(4))
    np.testing.assert_array_equal(d.sample(Scale(), (2, 1, 3, 3), np.random.default_rng(4), steps=100), plain)


def test_respacing_keeps_alpha_bar_and_calls_the_model_with_original_timesteps():
    d, model = gaussian_setup(T=100)
    spaced = d.respace(10)
    kept = [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
    d.sample(model, (3, 1), np.random.default_rng(0), steps=10)
    d.ddim_sample(model, (3, 1), np.random.default_rng(0), steps=10)
    assert [int(c[0]) for c in model.calls] == kept[::-1] * 2
    assert d.respace(1).timestep_map.tolist() == [99]
    with pytest.raises(ValueError, match="steps"):
        d.respace(101)


def test_respaced_samplers_still_recover_gaussian_data():
    d, model = gaussian_setup(T=1000, mu=0.1, s=0.3)
    for sampler in (d.sample, d.ddim_sample):
        x = sampler(model, (10_000, 1), np.random.default_rng(1), steps=250, clip_denoised=False,
                    dtype=np.float64)
        assert_gaussian(x, 0.1, 0.3, std_rtol=0.05)


def test_ddim_with_eta_1_is_ancestral_sampling_with_the_posterior_variance():
    """sigma_t^2 = eta^2 beta~_t, so eta = 1 takes the same steps (same draws) as variance="posterior"."""
    d, model = gaussian_setup(T=200, variance="posterior")
    ancestral = d.sample(model, (200, 2), np.random.default_rng(3), dtype=np.float64)
    ddim = d.ddim_sample(model, (200, 2), np.random.default_rng(3), eta=1.0, dtype=np.float64)
    np.testing.assert_allclose(ddim, ancestral, atol=1e-9)


def test_ddim_with_eta_0_is_deterministic():
    d, model = gaussian_setup(T=100)
    x_t = np.random.default_rng(0).standard_normal((4, 2))
    steps = [d.ddim_step(model, x_t, np.full(4, 50), np.random.default_rng(seed)) for seed in (1, 2)]
    np.testing.assert_array_equal(steps[0], steps[1])


def test_ddim_eta_0_and_eta_1_sample_the_same_distribution():
    d, model = gaussian_setup(T=1000, mu=0.1, s=0.3)
    for eta in (0.0, 1.0):
        x = d.ddim_sample(model, (10_000, 1), np.random.default_rng(2), eta=eta, clip_denoised=False,
                          dtype=np.float64)
        assert_gaussian(x, 0.1, 0.3, std_rtol=0.04)


# =============================================================================
# Variational bound
# =============================================================================

def discretized_gaussian_data(n, mu, s, rng):
    """n draws of N(mu, s^2) rounded to the 256-level grid, and the grid's probabilities."""
    edges = np.concatenate([[-np.inf], (LEVELS[:-1] + LEVELS[1:]) / 2, [np.inf]])
    p = np.diff(stats.norm.cdf(edges, mu, s))
    return rng.choice(LEVELS, size=(n, 1), p=p), p, edges


def test_discretized_gaussian_covers_the_line_and_stays_finite_in_the_tails():
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.01)), (-0.3, math.log(3.0))]:
        probs = np.exp(discretized_gaussian_log_likelihood(LEVELS, mean, log_scale))
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    # Bins 26 standard deviations away, where both CDFs round to 1 and their difference to 0.
    far = discretized_gaussian_log_likelihood(np.array([0.8, -0.8]), 0.0, math.log(0.03))
    lower, upper = stats.norm.logsf((0.8 - 1 / 255) / 0.03), stats.norm.logsf((0.8 + 1 / 255) / 0.03)
    expected = lower + np.log1p(-np.exp(upper - lower))
    assert far[0] == pytest.approx(expected, rel=1e-9) and far[1] == pytest.approx(expected, rel=1e-9)


def test_prior_term_is_the_exact_kl_and_about_1e5_bits_per_dim():
    d = GaussianDiffusion(linear_betas())
    x0 = np.random.default_rng(0).choice(LEVELS, size=(64, 1, 28, 28))
    ab = d.alphas_cumprod[-1]
    exact = (0.5 * (ab * x0 ** 2 + (1 - ab) - 1 - math.log(1 - ab))).reshape(64, -1).sum(1)
    np.testing.assert_allclose(d.prior_kl(x0), exact, rtol=1e-6)
    bits = nats_to_bits_per_dim(d.prior_kl(x0), 28 * 28)
    assert np.all((bits > 1e-6) & (bits < 1e-4))


def test_vlb_terms_are_nonnegative_and_a_subset_has_no_total():
    d = GaussianDiffusion(linear_betas(40, 1e-3, 0.3))
    x0 = np.random.default_rng(0).choice(LEVELS, size=(3, 1, 4, 4)).astype(np.float32)
    out = d.vlb_terms(Scale(), x0, np.random.default_rng(1))
    assert out["terms"].shape == (3, 40) and np.all(out["terms"] >= 0) and np.all(out["prior"] >= 0)
    np.testing.assert_allclose(out["total"], out["prior"] + out["terms"].sum(1))
    part = d.vlb_terms(Scale(), x0, np.random.default_rng(1), timesteps=[0, 39])
    assert part["terms"].shape == (3, 2) and "total" not in part


def test_vlb_of_the_optimal_model_matches_the_analytic_bound():
    """For Gaussian data with the optimal eps-model every term has a closed form.

    L_T: KL of N(sqrt(ab_T) x_0, 1 - ab_T) to N(0, 1). L_t (t >= 1): the two
    Gaussians share x_t's coefficient, so E[KL] = 1/2 (log(sigma^2 / beta~) +
    beta~ / sigma^2 - 1 + coef1^2 Var(x_0 | x_t) / sigma^2), with Var(x_0 | x_t)
    = s^2 (1 - ab) / (ab s^2 + 1 - ab). L_0: the predicted x_0 given x_0 is
    Gaussian, and each bin's probability is integrated by Gauss-Hermite
    quadrature. The total is an upper bound on the data's entropy H, and close to it.
    """
    mu, s, n = 0.1, 0.3, 4000
    d, model = gaussian_setup(T=1000, mu=mu, s=s)
    x0, p, edges = discretized_gaussian_data(n, mu, s, np.random.default_rng(0))
    out = d.vlb_terms(model, x0, np.random.default_rng(1), clip_denoised=False)

    ab = d.alphas_cumprod
    prior = 0.5 * (ab[-1] * x0[:, 0] ** 2 - ab[-1] - np.log(1 - ab[-1]))
    np.testing.assert_allclose(out["prior"], prior, atol=1e-15)

    var_x0 = s ** 2 * (1 - ab) / (ab * s ** 2 + 1 - ab)
    sigma2, beta_tilde, coef1 = d.model_variance[1:], d.posterior_variance[1:], d.posterior_mean_coef1[1:]
    kl = 0.5 * (np.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1 + coef1 ** 2 * var_x0[1:] / sigma2)
    kl_sum = kl.sum()
    mc_sum = out["terms"][:, 1:].sum(1)
    assert abs(mc_sum.mean() - kl_sum) < 4 * mc_sum.std() / math.sqrt(n)

    # x0_hat = mu + gain (x_1 - sqrt(ab_1) mu), with x_1 ~ N(sqrt(ab_1) x_0, 1 - ab_1)
    gain = math.sqrt(ab[0]) * s ** 2 / (ab[0] * s ** 2 + 1 - ab[0])
    z, w = np.polynomial.hermite_e.hermegauss(60)
    x0_hat = mu + gain * math.sqrt(ab[0]) * (LEVELS[:, None] - mu) + gain * math.sqrt(1 - ab[0]) * z
    # The decoder's variance, as the official code takes it: the variance of q(x_1 | x_2, x_0),
    # beta_2 (1 - ab_1) / (1 - ab_2), written out from the first two betas of the schedule.
    beta_1, beta_2 = scaled_linear(1000)[:2]
    decoder_variance = beta_2 * beta_1 / (1 - (1 - beta_1) * (1 - beta_2))
    cdf = stats.norm.cdf((edges[:, None, None] - x0_hat) / math.sqrt(decoder_variance))
    log_bin = np.log(np.maximum(cdf[1:] - cdf[:-1], 1e-300))[np.arange(256), np.arange(256)]
    decoder = -(p * (log_bin @ w) / w.sum()).sum()
    assert abs(out["terms"][:, 0].mean() - decoder) < 4 * out["terms"][:, 0].std() / math.sqrt(n)

    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    total, stderr = out["total"].mean(), out["total"].std() / math.sqrt(n)
    assert total > entropy - 3 * stderr
    assert total < 1.02 * entropy
    analytic = out["prior"].mean() + kl_sum + decoder
    assert abs(total - analytic) < 4 * stderr
