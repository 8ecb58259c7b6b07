"""Gaussian diffusion: the forward process, the training loss and the samplers of DDPM.

Follows Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models"
(https://arxiv.org/abs/2006.11239) and its official code
(github.com/hojonathanho/diffusion, diffusion_tf/diffusion_utils_2.py);
equation numbers are the paper's:

    q_sample        eq. 4     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    q_posterior     eqs. 6-7  q(x_{t-1} | x_t, x_0), a Gaussian
    loss            eq. 14    || eps - eps_theta(x_t, t) ||^2   (Algorithm 1)
    p_sample        eq. 11    one reverse step                  (Algorithm 2)
    vlb_terms       eq. 5     L_T + sum of L_{t-1} + L_0        (section 3.3)

and two later samplers that reuse a trained eps-model as it is:

    respace         Nichol & Dhariwal 2021, "Improved DDPM", section 4: fewer steps
    ddim_sample     Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12

Conventions:
- Timesteps are 0-based int arrays of shape (B,): t = 0 is the paper's t = 1
  and t = T - 1 the paper's t = T.
- Every constant of the schedule is computed once, in float64 NumPy. `extract`
  picks the rows of a batch, moves them to the device of x and casts them to
  its dtype, so float32 data stays float32 on the CPU and on the GPU.
- q_sample, q_posterior, predict_x0_from_eps and predict_eps_from_x0 use only
  `*`, `+` and `-`, so they take backend arrays or autograd Tensors and return
  the same kind. `loss` returns a Tensor to call backward() on. The samplers
  and the bound run under `no_grad()` on backend arrays.
- The model is called as `model(x, t)`: x a Tensor (B, C, H, W) (any (B, ...)
  works here), t an int array (B,) on the same device; it returns the
  predicted noise as a Tensor shaped like x.
"""
import numpy as np
from scipy import special

import autograd.functional as F
from autograd import Tensor, backend, no_grad


def extract(a, t, x):
    """a[t] reshaped to (B, 1, ..., 1) to broadcast against x, in x's dtype and on x's device.

    a: a float64 NumPy table (T,); t: int array (B,); x: array or Tensor (B, ...).
    """
    data = _array(x)
    rows = backend.to_device(take(a, t).astype(data.dtype), backend.device_of(data))
    return rows.reshape((len(rows),) + (1,) * (data.ndim - 1))        # (B, 1, ..., 1)


# Device copies of the (small, long-lived) schedule tables, made once each, so
# that indexing a table by a GPU array of timesteps reads it on the device
# rather than copying t to the host and waiting for the GPU at every step.
_device_tables = {}


def take(table, t):
    """table[t] for a NumPy table and int timesteps t, on t's device."""
    if not backend.is_cuda_array(t):
        return table[t]
    cached = _device_tables.get(id(table))
    if cached is None or cached[0] is not table:
        cached = _device_tables[id(table)] = (table, backend.to_device(table, "cuda"))
    return cached[1][t]


def _array(x):
    return x.data if isinstance(x, Tensor) else x


class GaussianDiffusion:
    """The DDPM forward process for a schedule `betas`, and its reverse samplers.

    betas: (T,) with index 0 holding beta_1 (see tinyddpm.schedule).
    variance: sigma_t^2 of the reverse process (section 3.2): "beta" (beta_t,
        the paper's default) or "posterior" (beta~_t, the variance of
        q(x_{t-1} | x_t, x_0)); the paper finds both give similar samples.
    timestep_map: the timesteps of the original chain that the model is called
        with (set by `respace`; by default 0..T-1).
    """

    def __init__(self, betas, variance="beta", timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in (0, 1)")
        if variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        T = self.T = len(betas)
        self.variance = variance
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map)
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {self.timestep_map.shape}")

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4
        self.betas = betas
        self.alphas = 1.0 - betas
        ab = self.alphas_cumprod = np.cumprod(self.alphas)              # alpha_bar_t
        ab_prev = self.alphas_cumprod_prev = np.append(1.0, ab[:-1])    # alpha_bar_{t-1}, with alpha_bar_0 = 1
        self.sqrt_alphas_cumprod = np.sqrt(ab)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ab)
        # eq. 4 solved for x_0: x_0 = sqrt(1 / alpha_bar) x_t - sqrt(1 / alpha_bar - 1) eps
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ab)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ab - 1.0)

        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I), eqs. 6-7
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # The posterior variance is 0 at t = 0 (given x_0, the step to x_0 is certain), so
        # its log would be -inf; the log is clipped to the value at t = 1, as in the
        # official code. With T = 1 there is no such value and log(beta_1) stands in.
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(self.alphas) / (1.0 - ab)

        # reverse p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), eq. 11
        self.sqrt_recip_alphas = np.sqrt(1.0 / self.alphas)
        self.betas_over_sqrt_one_minus_alphas_cumprod = betas / self.sqrt_one_minus_alphas_cumprod
        if variance == "beta":
            self.model_variance, self.model_log_variance = betas, np.log(betas)
        else:
            self.model_variance = self.posterior_variance
            self.model_log_variance = self.posterior_log_variance_clipped

    # =========================================================================
    # Forward process and its posterior
    # =========================================================================

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) in closed form (eq. 4). x0, noise: (B, ...); t: int (B,)."""
        return (x0 * extract(self.sqrt_alphas_cumprod, t, x0)
                + noise * extract(self.sqrt_one_minus_alphas_cumprod, t, x0))

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7).

        x0, x_t: (B, ...); t: int (B,). The mean is (B, ...); the variance and
        log-variance are (B, 1, ..., 1), to broadcast.
        """
        mean = (x0 * extract(self.posterior_mean_coef1, t, x_t)
                + x_t * extract(self.posterior_mean_coef2, t, x_t))
        return (mean, extract(self.posterior_variance, t, x_t),
                extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_x0_from_eps(self, x_t, t, eps):
        """The x_0 that eq. 4 implies for x_t and the noise eps. All (B, ...); t: int (B,)."""
        return (x_t * extract(self.sqrt_recip_alphas_cumprod, t, x_t)
                - eps * extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_eps_from_x0(self, x_t, t, x0):
        """The inverse of predict_x0_from_eps: the noise that takes x0 to x_t."""
        return ((x_t * extract(self.sqrt_recip_alphas_cumprod, t, x_t) - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # =========================================================================
    # Training (Algorithm 1)
    # =========================================================================

    def model_eps(self, model, x_t, t, labels=None):
        """model(x_t, t) (or model(x_t, t, labels)) as a Tensor; the model sees the original
        chain's timesteps, timestep_map[t]."""
        x = x_t if isinstance(x_t, Tensor) else Tensor(x_t)
        steps = backend.to_device(take(self.timestep_map, t), x.device)
        out = model(x, steps) if labels is None else model(x, steps, labels)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"the model must return a Tensor of the input's shape {tuple(x.shape)}, "
                             f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out

    def loss(self, model, x0, rng, min_snr_gamma=None, labels=None):
        """The simple loss of eq. 14 for one batch, as in Algorithm 1.

        x0: (B, ...) float32 or float64 array (or Tensor) of data in [-1, 1].
        rng: a NumPy or CuPy Generator on x0's device; it draws t ~ U{0..T-1} (B,)
            first, then eps ~ N(0, I) shaped like x0.
        Returns a scalar Tensor of x0's dtype: the mean of (eps - eps_theta(x_t, t))^2
        over every element (the paper writes a sum over pixels; the official code
        takes the mean, which only rescales the learning rate). backward() on it
        reaches the model's parameters.
        min_snr_gamma: None for eq. 14 as it is. A number gamma weights each
            example's squared error by min(SNR_t, gamma) / SNR_t, with SNR_t =
            alpha_bar_t / (1 - alpha_bar_t) (Hang et al. 2023, "Efficient
            Diffusion Training via Min-SNR Weighting Strategy", for an
            eps-prediction model): the nearly clean steps, where predicting the
            noise is hardest and matters least for the samples, count less.
        labels: for a class-conditional model, its labels y (B,): eps_theta(x_t, t, y).
        """
        x0 = _array(x0)
        t = rng.integers(0, self.T, size=x0.shape[0])                  # the paper's t ~ U{1..T}, 0-based
        noise = rng.standard_normal(x0.shape, dtype=x0.dtype)          # eps ~ N(0, I)
        x_t = self.q_sample(x0, t, noise)                              # eq. 4
        eps = self.model_eps(model, x_t, t, labels)
        if min_snr_gamma is None:
            return F.mse_loss(eps, Tensor(noise))                      # eq. 14
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        weight = Tensor(extract(np.minimum(snr, min_snr_gamma) / snr, t, x0))      # (B, 1, 1, 1)
        error = eps - Tensor(noise)
        return (error * error * weight).mean()

    # =========================================================================
    # Ancestral sampling (Algorithm 2)
    # =========================================================================

    def p_mean_variance(self, model, x_t, t, clip_denoised=True):
        """Mean and variance of p(x_{t-1} | x_t), and the predicted x_0.

        x_t: (B, ...) array; t: int (B,). Returns (mean, variance, log_variance,
        pred_x0): mean and pred_x0 (B, ...), variance and log_variance (B, 1, ..., 1).
        """
        x_t = _array(x_t)
        with no_grad():
            eps = self.model_eps(model, x_t, t).data
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            # Not the literal Algorithm 2, but what the official code samples with: the
            # eps-prediction is turned into an x_0 prediction, clipped to the data range
            # [-1, 1], and the step takes the posterior mean for that x_0. Without
            # clipping this is exactly the mean of eq. 11 (the tests check it); with it,
            # early steps (where eps-predictions imply wild x_0) cannot leave the data range.
            pred_x0 = pred_x0.clip(-1, 1)
            mean = self.q_posterior(pred_x0, x_t, t)[0]
        else:
            # eq. 11: 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)
            mean = (x_t - eps * extract(self.betas_over_sqrt_one_minus_alphas_cumprod, t, x_t)) \
                * extract(self.sqrt_recip_alphas, t, x_t)
        return (mean, extract(self.model_variance, t, x_t),
                extract(self.model_log_variance, t, x_t), pred_x0)

    def p_sample(self, model, x_t, t, rng, clip_denoised=True, noise_scale=1.0):
        """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z.

        x_t: (B, ...) array; t: int (B,); rng draws z ~ N(0, I) (always, so the
        random stream does not depend on t). z = 0 where t == 0 (the paper's t = 1):
        the last step returns the mean. noise_scale multiplies sigma_t z: 1 is the
        paper; 0 drops the noise, only to show why it is there (the samples then
        collapse toward the mode).
        """
        mean, variance, _, _ = self.p_mean_variance(model, x_t, t, clip_denoised)
        xp = backend.get_array_module(mean)
        z = rng.standard_normal(mean.shape, dtype=mean.dtype)
        nonzero = (t != 0).astype(mean.dtype).reshape((-1,) + (1,) * (mean.ndim - 1))
        return mean + (noise_scale * nonzero) * xp.sqrt(variance) * z

    def sample(self, model, shape, rng, steps=None, progress=None, return_trajectory=False,
               clip_denoised=True, noise_scale=1.0, dtype=np.float32):
        """Algorithm 2: x_T ~ N(0, I), then p_sample for t = T-1, ..., 0.

        shape: (B, ...) of the samples; rng: a NumPy or CuPy Generator, which also
        picks the device. steps: sample over this many respaced timesteps (see
        `respace`) instead of all T. progress: None/False, True (a tqdm bar) or a
        callable called once per step with no arguments (e.g. a bar's `update`).
        Returns the samples (B, ...) of `dtype`, clipped to [-1, 1]; with
        return_trajectory (True for 10 snapshots, or an int n) also a list of
        (t, x_t) pairs from x_T down to the final x_0, t numbered as in the paper
        on the original chain (T is pure noise, 0 the returned samples).
        """
        if steps is not None:
            return self.respace(steps).sample(model, shape, rng, None, progress, return_trajectory,
                                              clip_denoised, noise_scale, dtype)

        def step(x, t):
            return self.p_sample(model, x, t, rng, clip_denoised, noise_scale)
        return self._run_chain(step, shape, rng, progress, return_trajectory, dtype)

    def _run_chain(self, step, shape, rng, progress, return_trajectory, dtype):
        """Algorithm 2's loop: x_T ~ N(0, I), x <- step(x, t) for t = T-1, ..., 0, then clip."""
        x = rng.standard_normal(shape, dtype=dtype)                    # x_T ~ N(0, I)
        xp = backend.get_array_module(x)
        watch = _Watch(self, progress, return_trajectory)             # progress and snapshots
        with no_grad():
            for t in reversed(range(self.T)):                          # the paper's t = T, ..., 1
                watch.before(t, x)
                x = step(x, xp.full((shape[0],), t, dtype=xp.int64))
        return watch.end(x.clip(-1, 1))

    # =========================================================================
    # Fewer steps: respacing (Nichol & Dhariwal 2021) and DDIM (Song et al. 2021)
    # =========================================================================

    def respace(self, steps):
        """The same diffusion restricted to `steps` evenly spaced timesteps.

        Keeps t_i = round(linspace(T - 1, 0, steps)), reversed: always the last
        timestep (so x_T ~ N(0, I) still holds) and, for steps >= 2, the first.
        The new chain has the same alpha_bar at the kept steps, so its betas are
        beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}; the model is still
        called with the original t_i (timestep_map). respace(T) is this chain.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
                or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an integer in [1, {self.T}], got {steps!r}")
        kept = np.round(np.linspace(self.T - 1, 0, steps))[::-1].astype(np.int64)
        alphas_cumprod = self.alphas_cumprod[kept]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        # Between neighbouring kept steps the ratio is alpha_t itself: keep beta_t as it
        # was, so that respace(T) reproduces this chain bit for bit instead of up to rounding.
        neighbours = np.diff(kept, prepend=-1) == 1
        betas = np.where(neighbours, self.betas[kept], betas)
        return GaussianDiffusion(betas, self.variance, self.timestep_map[kept])

    def ddim_step(self, model, x_t, t, rng, eta=0.0, clip_denoised=True):
        """One step of DDIM (Song et al. 2021, eq. 12, with sigma_t of their eq. 16):

            x_{t-1} = sqrt(ab_{t-1}) x0_pred + sqrt(1 - ab_{t-1} - sigma_t^2) eps_pred + sigma_t z,
            sigma_t = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}),

        with ab = alpha_bar.

        sigma_t^2 is eta^2 times the posterior variance: eta = 0 is deterministic,
        eta = 1 is ancestral sampling with variance="posterior". x_t: (B, ...);
        t: int (B,); rng draws z (always, even when eta = 0).
        """
        x_t = _array(x_t)
        _, _, _, pred_x0 = self.p_mean_variance(model, x_t, t, clip_denoised)
        # With clipping, eps is recomputed from the clipped x0 so that both agree.
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        sigmas = eta * np.sqrt(self.posterior_variance)
        direction = np.sqrt(np.maximum(1.0 - self.alphas_cumprod_prev - sigmas ** 2, 0.0))
        z = rng.standard_normal(x_t.shape, dtype=x_t.dtype)
        return (pred_x0 * extract(np.sqrt(self.alphas_cumprod_prev), t, x_t)
                + eps * extract(direction, t, x_t) + z * extract(sigmas, t, x_t))

    def ddim_sample(self, model, shape, rng, steps=None, eta=0.0, progress=None,
                    return_trajectory=False, clip_denoised=True, dtype=np.float32):
        """DDIM sampling over `steps` evenly spaced timesteps (all T when None).

        Arguments and result as in `sample`; eta as in `ddim_step`.
        """
        if steps is not None:
            return self.respace(steps).ddim_sample(model, shape, rng, None, eta, progress,
                                                   return_trajectory, clip_denoised, dtype)

        def step(x, t):
            return self.ddim_step(model, x, t, rng, eta, clip_denoised)
        return self._run_chain(step, shape, rng, progress, return_trajectory, dtype)

    # =========================================================================
    # The variational bound (eq. 5): evaluated on the host in float64
    # =========================================================================

    def prior_kl(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats: a float64 NumPy (B,)."""
        x0 = backend.to_numpy(_array(x0)).astype(np.float64)
        t = np.full(x0.shape[0], self.T - 1)
        mean = x0 * extract(self.sqrt_alphas_cumprod, t, x0)
        log_variance = extract(np.log(1.0 - self.alphas_cumprod), t, x0)
        return _sum_per_example(normal_kl(mean, log_variance, 0.0, 0.0))

    def vlb_terms(self, model, x0, rng, timesteps=None, clip_denoised=True):
        """The terms of the variational bound (eq. 5) per example, in nats.

        x0: (B, ...) data on the 256-level grid of [-1, 1], on the model's device.
        rng: draws the noise of x_t ~ q(x_t | x_0), once per timestep in the order given.
        timesteps: the 0-based t to evaluate; by default all T (T model calls on the
            batch). A caller may pass a subset for speed; the total is then not given.
        Returns a dict of float64 NumPy arrays (the model runs on x0's device; the
        terms are computed on the host, where scipy gives a stable log-CDF):
            "prior": (B,) L_T
            "terms": (B, len(timesteps)); the column of 0-based t holds the paper's
                L_t: for t = 0 the decoder L_0 = -log p(x_0 | x_1) (a Gaussian
                discretized to 256 bins), for t >= 1 the KL of q(x_t | x_{t+1}, x_0)
                to p(x_t | x_{t+1}) (paper numbering)
            "timesteps": (len(timesteps),) the t evaluated
            "total": (B,) prior + the sum of the terms, an upper bound on -log p(x_0)
                (only when all timesteps were evaluated)
        """
        x0 = _array(x0)
        xp = backend.get_array_module(x0)
        x0_host = backend.to_numpy(x0).astype(np.float64)
        timesteps = np.arange(self.T) if timesteps is None else np.asarray(timesteps)
        terms = np.empty((x0.shape[0], len(timesteps)))
        for j, step in enumerate(timesteps):
            t = xp.full((x0.shape[0],), int(step), dtype=xp.int64)
            x_t = self.q_sample(x0, t, rng.standard_normal(x0.shape, dtype=x0.dtype))
            mean, _, _, _ = self.p_mean_variance(model, x_t, t, clip_denoised)
            mean = backend.to_numpy(mean).astype(np.float64)
            t_host = backend.to_numpy(t)
            log_variance = extract(self.model_log_variance, t_host, x0_host)
            if step == 0:
                # The decoder's variance follows the official code (and improved-diffusion),
                # not sigma_1^2: their log-variance for sigma^2 = beta is
                # log(append(posterior_variance[1], betas[1:])), so at t = 0 it is the clipped
                # posterior log-variance, log beta~_2 (about half of beta_1), the same as for
                # sigma^2 = beta~. log beta_1 would widen the decoder and make the bound pessimistic.
                decoder_log_variance = extract(self.posterior_log_variance_clipped, t_host, x0_host)
                nll = -discretized_gaussian_log_likelihood(x0_host, mean, 0.5 * decoder_log_variance)
                terms[:, j] = _sum_per_example(nll)
            else:
                x_t_host = backend.to_numpy(x_t).astype(np.float64)
                q_mean, _, q_log_variance = self.q_posterior(x0_host, x_t_host, t_host)
                kl = normal_kl(q_mean, q_log_variance, mean, log_variance)
                terms[:, j] = _sum_per_example(kl)
        out = {"prior": self.prior_kl(x0_host), "terms": terms, "timesteps": timesteps}
        if np.array_equal(np.sort(timesteps), np.arange(self.T)):
            out["total"] = out["prior"] + terms.sum(axis=1)
        return out


class _Watch:
    """What a sampling loop reports besides its result: progress, and x_t at a few steps.

    progress: None/False, True (a tqdm bar) or a callable called once per step.
    return_trajectory: False, True (10 snapshots) or an int n of them, evenly
    spaced from x_T down to the final samples; `end` then returns (x, [(t, x_t)])
    with t numbered as in the paper on the original chain.
    """

    def __init__(self, diffusion, progress, return_trajectory):
        self.diffusion, self.progress, self.return_trajectory = diffusion, progress, return_trajectory
        self.bar = None
        if progress is True:
            from tqdm import tqdm
            self.bar = tqdm(total=diffusion.T, desc="sampling")
            self.progress = self.bar.update
        T = diffusion.T
        n = 10 if return_trajectory is True else int(return_trajectory)
        self.snapshot_at = set(np.round(np.linspace(T - 1, 0, min(n, T))).astype(int).tolist())
        self.trajectory = []

    def before(self, t, x):
        if self.progress and t != self.diffusion.T - 1:
            self.progress()                          # the step before this one is done
        if self.return_trajectory and t in self.snapshot_at:
            self.trajectory.append((int(self.diffusion.timestep_map[t]) + 1, x))

    def end(self, x):
        if self.progress:
            self.progress()
        if self.bar is not None:
            self.bar.close()
        return (x, self.trajectory + [(0, x)]) if self.return_trajectory else x


# =============================================================================
# Gaussian helpers for the bound (host NumPy, float64)
# =============================================================================

def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), element-wise, in nats."""
    return 0.5 * (log_var2 - log_var1 + np.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * np.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(bin of x) under N(mean, exp(log_scale)^2), for x on the 256-level grid of [-1, 1].

    Each bin is 2/255 wide around its level; the two edge bins extend to -inf and
    +inf so the 256 probabilities sum to 1 (as in the official code). Element-wise.
    """
    inv_std = np.exp(-log_scale)
    upper = (x - mean + 1.0 / 255) * inv_std     # bin edges in standard units
    lower = (x - mean - 1.0 / 255) * inv_std
    return np.where(x < -0.999, special.log_ndtr(upper),
                    np.where(x > 0.999, special.log_ndtr(-lower), _log_ndtr_diff(lower, upper)))


def _log_ndtr_diff(a, b):
    """log(Phi(b) - Phi(a)) for a < b, without rounding either Phi to 1 or the difference to 0."""
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): take the side where both lie in the lower tail,
    # then log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - Phi(lo) / Phi(hi)).
    flip = a > 0
    lo, hi = np.where(flip, -b, a), np.where(flip, -a, b)
    log_hi = special.log_ndtr(hi)
    return log_hi + np.log(-np.expm1(special.log_ndtr(lo) - log_hi))


def _sum_per_example(x):
    return x.reshape(x.shape[0], -1).sum(axis=1)


def nats_to_bits_per_dim(nats, dims):
    """A per-example bound in nats as bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * np.log(2.0))
