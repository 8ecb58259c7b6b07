"""The seed's claims about DDPM, each checked on the real code paths.

The project started from a Chinese explainer of DDPM (docs/design.md sums it
up); each test quotes the sentence it checks, with a translation.
"""
import math

import numpy as np
from scipy import stats

from autograd import Tensor
from test_diffusion import LEVELS, Scale, gaussian_setup
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.schedule import linear_betas


def test_x_T_is_nearly_standard_normal_for_the_linear_schedule():
    """Claim 1, "当T非常大的时候, alpha_bar 由一堆(0,1)区间内的α乘起来,趋近于0 ... 所以 x_T ~ N(0,1)".

    (When T is large, alpha_bar, a product of many alphas in (0, 1), goes to 0,
    so x_T ~ N(0, 1).) For betas = linspace(1e-4, 0.02, T) and any x_0 in [-1, 1],
    KL(q(x_T | x_0) || N(0, 1)) per dimension is at most its value at |x_0| = 1,
    1/2 (-log(1 - ab_T) - ab_T + ab_T) = -1/2 log(1 - ab_T), about 2e-5 nats for
    T = 1000; and it shrinks as T grows.
    """
    x0 = np.linspace(-1, 1, 201).reshape(-1, 1)
    worst = []
    for T in (100, 300, 1000):
        d = GaussianDiffusion(linear_betas(T))
        kl = d.prior_kl(x0)
        bound = -0.5 * math.log(1 - d.alphas_cumprod[-1])
        assert kl.max() <= bound * (1 + 1e-9) and kl.max() == kl[0] == kl[-1]
        worst.append(kl.max())
    assert worst[0] > worst[1] > worst[2]
    assert worst[2] < 1e-4 and worst[0] > 0.1        # at T = 100, x_T is still far from noise


def test_posterior_of_one_step_is_gaussian_with_the_stated_mean_and_variance():
    """Claim 2, "在已知x0的情况下 ... 单步去噪(x_t → x_{t-1})的表达式 ... 依然是一个高斯分布".

    (Given x_0, the one-step denoising x_t -> x_{t-1} can be written down, and it
    is still a Gaussian.) Monte Carlo: draw x_{t-1} ~ q(x_{t-1} | x_0), then
    x_t ~ q(x_t | x_{t-1}); among the pairs whose x_t falls in a narrow bin,
    x_{t-1} must follow N(mean, variance) of `q_posterior` (eqs. 6-7).
    """
    d = GaussianDiffusion(linear_betas())
    rng = np.random.default_rng(0)
    t, x0, n = 100, 0.5, 2_000_000
    ab, ab_prev = d.alphas_cumprod[t], d.alphas_cumprod_prev[t]
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * rng.standard_normal(n)
    x_t = math.sqrt(d.alphas[t]) * x_prev + math.sqrt(d.betas[t]) * rng.standard_normal(n)
    center, half_width = math.sqrt(ab) * x0, 0.01 * math.sqrt(1 - ab)
    picked = x_prev[abs(x_t - center) < half_width]
    mean, var, _ = d.q_posterior(np.array([x0]), np.array([center]), np.array([t]))
    assert len(picked) > 10_000
    assert abs(picked.mean() - mean[0]) < 5 * math.sqrt(var[0] / len(picked))
    assert abs(picked.var() / var[0] - 1) < 5 * math.sqrt(2 / len(picked))
    assert stats.kstest(picked, "norm", args=(mean[0], math.sqrt(var[0]))).pvalue > 1e-3


def test_eps_parameterized_mean_equals_the_x0_parameterized_mean():
    """Claim 3, "式子中,没有显式的X0出现 ... 观察后发现是前向过程中加入的噪声, 所以 ... 网络的工作是在预测噪声".

    (Written without x_0, the posterior mean's only unknown is the noise added in
    the forward pass, so the network predicts the noise.) With the true noise,
    eq. 11's mean 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) is the
    posterior mean of eq. 7 for the true x_0; with any predicted noise, it is
    the posterior mean for the x_0 that noise implies.
    """
    d = GaussianDiffusion(linear_betas())
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (6, 1, 3, 3))
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 1, 10, 250, 600, 999])
    x_t = d.q_sample(x0, t, noise)
    true_noise = lambda x, steps: Tensor(noise)
    eps_mean = d.p_mean_variance(true_noise, x_t, t, clip_denoised=False)[0]
    np.testing.assert_allclose(eps_mean, d.q_posterior(x0, x_t, t)[0], atol=1e-10)

    model = Scale(0.7, dtype=np.float64)
    eps_mean = d.p_mean_variance(model, x_t, t, clip_denoised=False)[0]
    implied_x0 = d.predict_x0_from_eps(x_t, t, model(Tensor(x_t), t).data)
    np.testing.assert_allclose(eps_mean, d.q_posterior(implied_x0, x_t, t)[0], atol=1e-10)


def test_with_the_variance_fixed_each_kl_term_is_a_weighted_eps_l2():
    """The seed, "作者固定了方差 ... 把两个均值相减 ... 因此将损失函数设计为预测出噪声和实际噪声的L2 Loss".

    (The variance is fixed, so subtracting the two means leaves the noise, hence
    the L2 loss between predicted and true noise.) Each L_{t-1} is a constant plus
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) ||eps - eps_theta(x_t, t)||^2 (eq. 12).
    """
    d = GaussianDiffusion(linear_betas(100, 1e-3, 0.2))
    x0 = np.random.default_rng(2).choice(LEVELS, size=(5, 1, 4, 4))
    model = Scale(0.3, dtype=np.float64)
    for t in (1, 40, 99):
        out = d.vlb_terms(model, x0, np.random.default_rng(t), timesteps=[t], clip_denoised=False)
        kl = out["terms"][:, 0]
        noise = np.random.default_rng(t).standard_normal(x0.shape)       # the same draw as vlb_terms
        x_t = d.q_sample(x0, np.full(5, t), noise)
        squared_error = ((noise - model(Tensor(x_t), t).data) ** 2).reshape(5, -1).sum(1)
        sigma2, beta_tilde = d.model_variance[t], d.posterior_variance[t]
        weight = d.betas[t] ** 2 / (2 * sigma2 * d.alphas[t] * (1 - d.alphas_cumprod[t]))
        constant = x0[0].size * 0.5 * (math.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)
        np.testing.assert_allclose(kl, constant + weight * squared_error, rtol=1e-7)


def test_the_prior_term_has_no_parameters_but_the_decoder_term_has():
    """The seed, "第一项 ... 这与网络无关! 第三项 ... 与网络无关!".

    (The first term, L_T, does not involve the network; nor does the third, L_0.)
    True of L_T, and the code computes it without a model. Not true of L_0 =
    -log p_theta(x_0 | x_1) in the paper (section 3.3): its mean is the network's,
    so two models give different L_0. The seed's conclusion stands all the same:
    the simple loss trains only the L_{t-1} terms' eps-prediction.
    """
    d = GaussianDiffusion(linear_betas(50, 1e-3, 0.3))
    x0 = np.random.default_rng(3).choice(LEVELS, size=(4, 1, 3, 3))
    terms = [d.vlb_terms(Scale(w, dtype=np.float64), x0, np.random.default_rng(0), timesteps=[0])
             for w in (0.1, 0.9)]
    np.testing.assert_array_equal(terms[0]["prior"], terms[1]["prior"])
    assert np.all(abs(terms[0]["terms"] - terms[1]["terms"]) > 1e-3)


def test_dropping_the_noise_term_collapses_the_samples():
    """Claim 4, "这里最后还要加的这个 (sigma_t z) 很反常 ... 这是为了在生成式模型中让每次的output不固定".

    (The sigma_t z added at the end of each step looks odd; it is there so that
    the output is not the same every time.) With the optimal model for Gaussian
    data, the sampler with the noise term matches the data's spread; without it
    (noise_scale=0) every chain falls to nearly the same point.
    """
    d, model = gaussian_setup(T=200, mu=0.1, s=0.3)
    spreads = [d.sample(model, (2000, 1), np.random.default_rng(0), clip_denoised=False,
                        noise_scale=scale, dtype=np.float64).std() for scale in (1.0, 0.0)]
    assert abs(spreads[0] / 0.3 - 1) < 0.05
    assert spreads[1] / spreads[0] < 0.5
