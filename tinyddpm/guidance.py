"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

One network learns both eps(x_t, t, y), the noise given the digit y, and
eps(x_t, t, null), the noise of any digit: training replaces the label by the
null label with probability p_uncond (tinyddpm/train.py). Sampling then
moves each step further in the direction that the label adds:

    eps_guided = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null)        (eq. 6 of the paper)

w = 0 is the plain conditional model; larger w draws digits that look more
like their label and less varied. `Guided` wraps a model so that every
sampler, which calls model(x, t), gets eps_guided; the two predictions come
from one call on a doubled batch.
"""
import numpy as np

from autograd import backend
from autograd import functional as F

NUM_DIGITS = 10
NULL_LABEL = NUM_DIGITS            # the index of "no label" in the UNet's label embedding


class Guided:
    """model(x, t, labels) with classifier-free guidance of weight w, called as model(x, t).

    model: a class-conditional UNet (or what nn.batch_parallel made of one).
    labels: int array (B,) of the digits asked for, on the model's device.
    """

    def __init__(self, model, labels, w):
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {w}")
        self.model, self.labels, self.w = model, labels, float(w)

    def __call__(self, x, t):
        if self.w == 0:                                     # no second prediction to mix in
            return self.model(x, t, self.labels)
        B = x.shape[0]
        xp = backend.get_array_module(self.labels)
        null = xp.full_like(self.labels, NULL_LABEL)
        eps = self.model(F.concat([x, x], axis=0), xp.concatenate([t, t]),
                         xp.concatenate([self.labels, null]))        # one call, 2B images
        conditional, unconditional = eps[:B], eps[B:]
        w = x.dtype.type(self.w)
        return conditional * (1 + w) - unconditional * w


def drop_labels(labels, p_uncond, rng):
    """labels with each one replaced by the null label with probability p_uncond."""
    xp = backend.get_array_module(labels)
    return xp.where(rng.random(labels.shape[0]) < p_uncond, NULL_LABEL, labels)


def balanced_labels(n):
    """n labels covering the ten digits as evenly as n allows, the first n mod 10 digits once
    more, sorted (a grid's rows then follow the digits): 12 -> 0 0 1 1 2 3 4 5 6 7 8 9."""
    counts = [n // NUM_DIGITS + (digit < n % NUM_DIGITS) for digit in range(NUM_DIGITS)]
    return np.repeat(np.arange(NUM_DIGITS), counts)
