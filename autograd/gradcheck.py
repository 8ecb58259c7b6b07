"""Gradient checking: does an op's backward agree with finite differences?

For f: inputs -> output and a random output cotangent u, backward computes
g_i = d<u, f>/d x_i. Central differences estimate the same numbers from two
forward passes:  d<u, f>/dx ~ (<u, f(x + h)> - <u, f(x - h)>) / 2h.

Two ways to compare them (the `mode` argument):
- "elements": perturb every input element in turn; exact per-element
  comparison, 2 forward passes per element, for small sizes.
- "adjoint": perturb all inputs at once along a random direction v and
  compare <g, v> with the directional derivative (the dot-product test
  <u, J v> = <J^T u, v>): 2 forward passes whatever the size, so whole
  networks are checkable.
A random u (not all ones) makes sure that a backward which, say, sums where it
should not, cannot agree by accident. Run it in float64: in float32 the
differences drown in rounding error.
"""
import math

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    pass


def _forward_dot(fn, inputs, u):
    with no_grad():
        out = fn(*inputs)
    return float(backend.to_numpy((out.data * u).sum()))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, mode="auto",
              max_elements=4096, seed=0, raise_exception=True):
    """Check `backward()` of `fn(*inputs)` for every input with requires_grad.

    fn: takes the input Tensors, returns one Tensor.
    inputs: Tensors; those that require grad are checked, and must be float64.
    mode: "elements", "adjoint", or "auto" (elements when the inputs together
      hold at most `max_elements` values, then adjoint as well).
    Returns True, or raises GradcheckError naming the input, the worst index
    and the two numbers (returns False instead when raise_exception=False).
    """
    checked = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for x in checked:
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs, got {x.dtype} for shape {tuple(x.shape)}")
    if mode not in ("auto", "elements", "adjoint"):
        raise ValueError(f"gradcheck: unknown mode {mode!r}")

    xp = checked[0].xp
    rng = np.random.default_rng(seed)
    with no_grad():
        out_shape = fn(*inputs).shape
    u = xp.asarray(rng.standard_normal(out_shape))

    for x in checked:
        x.grad = None
    out = fn(*inputs)
    out.backward(out.data * 0 + u)
    analytic = [backend.to_numpy(x.grad) if x.grad is not None else np.zeros(x.shape)
                for x in checked]

    try:
        total = sum(x.size for x in checked)
        if mode == "elements" or (mode == "auto" and total <= max_elements):
            _check_elements(fn, inputs, checked, analytic, u, eps, atol, rtol)
        if mode in ("adjoint", "auto"):
            _check_adjoint(fn, inputs, checked, analytic, u, eps, atol, rtol, rng)
    except GradcheckError:
        if raise_exception:
            raise
        return False
    return True


def _check_elements(fn, inputs, checked, analytic, u, eps, atol, rtol):
    for n, (x, grad) in enumerate(zip(checked, analytic)):
        numeric = np.zeros(x.shape)
        x.data = x.xp.ascontiguousarray(x.data)
        flat = x.data.reshape(-1)  # a view: perturbing it perturbs x
        for i in range(flat.size):
            orig = flat[i].copy()
            flat[i] = orig + eps
            plus = _forward_dot(fn, inputs, u)
            flat[i] = orig - eps
            minus = _forward_dot(fn, inputs, u)
            flat[i] = orig
            numeric.reshape(-1)[i] = (plus - minus) / (2 * eps)
        err = np.abs(numeric - grad) - (atol + rtol * np.abs(numeric))
        if (err > 0).any():
            worst = tuple(int(i) for i in np.unravel_index(np.argmax(err), x.shape))
            raise GradcheckError(
                f"gradcheck: input {n} of shape {tuple(x.shape)}: backward gives "
                f"{grad[worst]:.10g} at index {worst}, finite differences give "
                f"{numeric[worst]:.10g} (|diff| {abs(grad[worst] - numeric[worst]):.3g}; "
                f"atol {atol}, rtol {rtol}); {int((err > 0).sum())} of {x.size} elements off")


def _check_adjoint(fn, inputs, checked, analytic, u, eps, atol, rtol, rng):
    xp = checked[0].xp
    directions = [rng.standard_normal(x.shape) for x in checked]
    originals = [x.data.copy() for x in checked]
    for x, v, x0 in zip(checked, directions, originals):
        x.data[...] = x0 + eps * xp.asarray(v)
    plus = _forward_dot(fn, inputs, u)
    for x, v, x0 in zip(checked, directions, originals):
        x.data[...] = x0 - eps * xp.asarray(v)
    minus = _forward_dot(fn, inputs, u)
    for x, x0 in zip(checked, originals):
        x.data[...] = x0
    numeric = (plus - minus) / (2 * eps)
    predicted = float(sum((g * v).sum() for g, v in zip(analytic, directions)))
    # <g, v> sums n terms of random sign, so it grows like sqrt(n); so does an
    # error of a fixed relative size in g. The L2 norm of the terms has the same
    # growth (a plain sum of |terms| grows like n and would hide real errors in
    # large inputs) and does not vanish when the total happens to cancel.
    scale = max(abs(numeric), math.sqrt(sum(float(((g * v) ** 2).sum())
                                            for g, v in zip(analytic, directions))))
    if abs(numeric - predicted) > atol + rtol * scale:
        shapes = [tuple(x.shape) for x in checked]
        raise GradcheckError(
            f"gradcheck (adjoint test) on inputs of shapes {shapes}: <backward, v> = "
            f"{predicted:.10g} but the directional finite difference is {numeric:.10g} "
            f"(|diff| {abs(numeric - predicted):.3g}, scale {scale:.3g}; atol {atol}, rtol {rtol})")
