"""Optimizers, gradient clipping and an exponential moving average of weights.

Every update is done in place on the parameter arrays, with scalars cast to
the parameters' dtype so float32 stays float32. Each optimizer exposes its
state as a flat {name: array} dict (plus plain numbers) so a checkpoint can
store it in an .npz and a resumed run continues exactly.

The updates themselves (`adam_update`, `ema_update`, `clip_grad_norm`) are
loops over the parameters, one formula each. autograd/fast may swap in
twins that do the same work on one flat buffer of all the parameters
(a handful of GPU kernels instead of a few per parameter); such a twin may
replace the arrays in the lists it is given by views of one buffer, with the
same values, so an optimizer reads its state from its own lists, never from
copies made earlier.
"""
import numpy as np

from . import backend
from .seam import swappable


class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be >= 0, got {lr}")
        self.lr = lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _state_arrays(self):
        """{slot name: list of per-parameter arrays}; subclasses fill it."""
        return {}

    def state_dict(self):
        state = {"step": self.step_count}
        for slot, arrays in self._state_arrays().items():
            for i, a in enumerate(arrays):
                state[f"{slot}.{i}"] = a
        return state

    def load_state_dict(self, state):
        name = type(self).__name__
        expected = {"step"} | {f"{slot}.{i}" for slot, arrays in self._state_arrays().items()
                               for i in range(len(arrays))}
        unexpected = sorted(set(state) - expected)
        if "step" not in state or unexpected:
            raise ValueError(f"{name}.load_state_dict: "
                             + ("missing 'step'" if "step" not in state else "")
                             + (f" unexpected keys {unexpected}" if unexpected else ""))
        self.step_count = int(state["step"])
        for slot, arrays in self._state_arrays().items():
            for i, (p, a) in enumerate(zip(self.params, arrays)):
                key = f"{slot}.{i}"
                if key not in state:
                    raise ValueError(f"{name}.load_state_dict: missing {key!r}")
                value = state[key]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{name}.load_state_dict: {key!r} has shape "
                                     f"{tuple(value.shape)}, parameter {i} has {tuple(p.shape)}")
                a[...] = p.xp.asarray(backend.to_device(value, p.device), dtype=p.dtype)


class SGD(Optimizer):
    """p <- p - lr * v,  v <- momentum * v + g  (PyTorch's form of momentum)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity = [p.xp.zeros_like(p.data) for p in self.params]
        self.step_count = 0

    def _state_arrays(self):
        return {"velocity": self.velocity}

    def step(self):
        self.step_count += 1
        for p, v in zip(self.params, self.velocity):
            if p.grad is None:
                continue
            g = p.grad + p.dtype.type(self.weight_decay) * p.data if self.weight_decay else p.grad
            if self.momentum:
                v *= p.dtype.type(self.momentum)
                v += g
                g = v
            p.data -= p.dtype.type(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1), with L2 weight decay added to g.

    One step counter serves all parameters (PyTorch counts per parameter); the
    two differ only for a parameter that sometimes has no gradient.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [p.xp.zeros_like(p.data) for p in self.params]    # first moments
        self.v = [p.xp.zeros_like(p.data) for p in self.params]    # second moments
        self.step_count = 0

    def _state_arrays(self):
        return {"m": self.m, "v": self.v}

    def step(self):
        self.step_count += 1
        adam_update(self.params, self.m, self.v, self.lr, self.betas, self.eps,
                    self.weight_decay, self.step_count)


@swappable
def adam_update(params, ms, vs, lr, betas, eps, weight_decay, t):
    """Step t (1, 2, ...) of Adam for every parameter with a gradient, in place:

        m <- b1 m + (1 - b1) g,        v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t),        v_hat = v / (1 - b2^t)
        p <- p - lr m_hat / (sqrt(v_hat) + eps)

    m_hat and v_hat undo the bias of starting m and v at zero.
    """
    b1, b2 = betas
    for p, m, v in zip(params, ms, vs):
        if p.grad is None:
            continue
        cast = p.dtype.type
        g = p.grad + cast(weight_decay) * p.data if weight_decay else p.grad
        m *= cast(b1)
        m += cast(1 - b1) * g
        v *= cast(b2)
        v += cast(1 - b2) * (g * g)
        m_hat = m / cast(1 - b1 ** t)
        v_hat = v / cast(1 - b2 ** t)
        p.data -= cast(lr) * m_hat / (p.xp.sqrt(v_hat) + cast(eps))


@swappable
def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    Returns the norm before clipping, in the gradients' dtype and on their
    device: a 0-d array, as PyTorch returns a tensor (0.0 when no parameter
    has a gradient). Nothing here reads a
    value back to the host, so on a GPU a step that does not read the norm
    goes on without waiting for the device: every gradient is multiplied by
    the factor (max_norm / norm where the norm is over the limit, else 1),
    computed on the device. A NaN norm leaves the gradients as they are.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return np.float64(0.0)
    xp = backend.get_array_module(grads[0])
    total = xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads))
    # The 1e-6 (PyTorch's too) leaves the clipped norm a hair under max_norm.
    factor = xp.where(total > max_norm, max_norm / (total + 1e-6), xp.ones_like(total))
    for g in grads:
        g *= factor.astype(g.dtype, copy=False)
    return total


class EMA:
    """Exponential moving average of parameters: shadow <- d shadow + (1 - d) p.

    DDPM samples from these averaged weights (decay 0.9999 in the paper; short
    runs want less, since the average remembers ~1/(1-d) steps).
    """

    def __init__(self, params, decay=0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.data.copy() for p in self.params]

    def update(self):
        ema_update(self.shadow, self.params, self.decay)

    def copy_to(self, model_or_params):
        """Write the averaged weights into a model (or list of parameters) of the same shapes."""
        targets = model_or_params.parameters() if hasattr(model_or_params, "parameters") \
            else list(model_or_params)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA.copy_to: {len(targets)} parameters, EMA holds {len(self.shadow)}")
        for p, s in zip(targets, self.shadow):
            if tuple(p.shape) != tuple(s.shape):
                raise ValueError(f"EMA.copy_to: shape {tuple(p.shape)} vs {tuple(s.shape)}")
            p.data[...] = backend.to_device(s, p.device)

    def state_dict(self):
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state):
        for i, s in enumerate(self.shadow):
            key = f"shadow.{i}"
            if key not in state or tuple(state[key].shape) != tuple(s.shape):
                raise ValueError(f"EMA.load_state_dict: {key!r} missing or of the wrong shape")
            s[...] = backend.to_device(state[key], self.params[i].device)


@swappable
def ema_update(shadows, params, decay):
    """shadow <- d shadow + (1 - d) p for each parameter, in place."""
    for s, p in zip(shadows, params):
        d = p.dtype.type(decay)
        s *= d
        s += (1 - d) * p.data
