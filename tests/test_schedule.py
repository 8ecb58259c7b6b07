"""Noise schedules against their formulas, written out again here with plain loops."""
import math

import numpy as np
import pytest

from tinyddpm.schedule import cosine_betas, linear_betas


def test_linear_betas_rise_evenly_from_start_to_end():
    betas = linear_betas(1000, 1e-4, 0.02)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    step = (0.02 - 1e-4) / 999
    expected = [1e-4 + i * step for i in range(1000)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[0] == 1e-4 and betas[-1] == 0.02       # index 0 holds beta_1


def test_linear_schedule_ends_in_nearly_pure_noise():
    """The seed: alpha_bar_T -> 0 so that x_T is about N(0, I); for T = 1000 it is 4.04e-5."""
    alpha_bar = 1.0
    for beta in linear_betas():
        alpha_bar *= 1.0 - beta
    assert alpha_bar == pytest.approx(4.035e-5, rel=1e-3)


def test_cosine_betas_follow_eq_17():
    T, s = 50, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = [min(1 - (f[t] / f[0]) / (f[t - 1] / f[0]), 0.999) for t in range(1, T + 1)]
    betas = cosine_betas(T, s)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)


def test_cosine_alpha_bar_is_the_squared_cosine_until_the_clip():
    T, s = 1000, 0.008
    betas = cosine_betas(T, s)
    assert betas.max() == 0.999 and betas[-1] == 0.999   # the clip acts only at the end
    t = np.arange(1, T)
    alpha_bar = np.cumprod(1 - betas)[:-1]
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(alpha_bar, f(t) / f(0), rtol=1e-9)


def test_cosine_betas_respect_max_beta():
    assert cosine_betas(100, max_beta=0.5).max() == 0.5


@pytest.mark.parametrize("call, name", [
    (lambda: linear_betas(0), "T"),
    (lambda: linear_betas(2.5), "T"),
    (lambda: linear_betas(10, beta_start=0.0), "beta_start"),
    (lambda: linear_betas(10, beta_end=1.0), "beta_end"),
    (lambda: linear_betas(10, beta_start=0.1, beta_end=0.01), "beta_start"),
    (lambda: cosine_betas(0), "T"),
    (lambda: cosine_betas(10, s=-0.1), "s"),
    (lambda: cosine_betas(10, max_beta=1.0), "max_beta"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
