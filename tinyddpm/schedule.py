"""Noise schedules: the variances beta_1..beta_T of the forward process.

- `linear_betas`: Ho, Jain, Abbeel 2020 ("Denoising Diffusion Probabilistic
  Models"), section 4: betas rise linearly from 1e-4 to 0.02 over T = 1000
  steps, so that alpha_bar_T = prod(1 - beta_t) is about 4e-5 and x_T is
  nearly pure noise.
- `cosine_betas`: Nichol & Dhariwal 2021 ("Improved Denoising Diffusion
  Probabilistic Models"), eq. 17: alpha_bar follows a squared cosine, so the
  noise is added more evenly over the chain than with the linear schedule.

Both return float64 NumPy arrays of length T; index 0 holds beta_1 (the
0-based timestep convention of `tinyddpm.diffusion`).
"""
import numpy as np


def _check_T(T):
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")


def linear_betas(T=1000, beta_start=1e-4, beta_end=0.02):
    """betas = linspace(beta_start, beta_end, T): the DDPM paper's schedule.

    Returns a float64 array of shape (T,); index 0 is beta_1.
    """
    _check_T(T)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    if beta_start > beta_end:
        raise ValueError(f"beta_start ({beta_start}) must not exceed beta_end ({beta_end})")
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """The cosine schedule of Nichol & Dhariwal 2021, eq. 17.

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2),
    and beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) for t = 1..T. The small
    offset s keeps beta_1 from being vanishingly small. Near t = T the ratio
    goes to 0 and beta_T to 1, which would make the last step singular, so the
    betas are clipped at `max_beta` (0.999 in the paper).

    Returns a float64 array of shape (T,); index 0 is beta_1.
    """
    _check_T(T)
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0, got {s!r}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
    steps = np.arange(T + 1, dtype=np.float64) / T          # t / T for t = 0..T
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.minimum(betas, max_beta)
