"""What every op test does, so that each case in the test files is one line.

A case is an op (`fn`, on Tensors), the shapes of its inputs, and an oracle:
the same computation written independently on NumPy arrays (loops, SciPy,
closed forms). Three checks run on every case:
- `check_forward`: float64 output equals the oracle's;
- `check_gradient`: `autograd.gradcheck` in float64 ("elements" at small sizes,
  "adjoint" at realistic ones);
- `check_float32`: float32 inputs give a float32 output and float32 gradients,
  equal to the float64 ones up to float32 rounding.
"""
import os

import numpy as np
import pytest

import autograd
from autograd import Tensor

# NumPy 2 no longer lets a float64 scalar's value decide a result's dtype (NEP 50),
# and prints NumPy integers as np.int64(1): some dtype and message bugs show only there.

# Tolerances of the element-by-element check: central differences with step
# 1e-6 are accurate to ~1e-10 in float64, so 1e-6 absolute plus 1e-4 relative
# leaves room for rounding while a backward off by 1% anywhere still fails.
ELEMENT_TOL = dict(eps=1e-6, atol=1e-6, rtol=1e-4)

# The adjoint check compares one number, <backward, v>, to a directional
# difference, within atol + rtol * sum|g v|. That scale grows like the input
# size while a real error in <g, v> grows like its square root, so at realistic
# sizes rtol must be small for a 1% error to show: 1e-7 is still ~1000x above
# the float64 rounding these ops produce (measured: below 1e-10).
ADJOINT_TOL = dict(eps=1e-6, atol=1e-8, rtol=1e-7)


class Case:
    """fn(*Tensors) -> Tensor, with `oracle(*arrays)` the same thing in NumPy.

    `oracle` is None only for ops that draw random numbers (dropout): their
    stream depends on the dtype, so the float32 and float64 runs differ and
    their forward is tested by its properties instead.
    """

    def __init__(self, fn, oracle, shapes, positive=False):
        self.fn, self.oracle, self.shapes, self.positive = fn, oracle, shapes, positive

    def arrays(self, seed=0):
        """float64 inputs: standard normal, or in [0.5, 2] for ops defined on positives."""
        rng = np.random.default_rng(seed)
        if self.positive:
            return [rng.uniform(0.5, 2.0, s) for s in self.shapes]
        return [rng.standard_normal(s) for s in self.shapes]

    def tensors(self, dtype=np.float64, seed=0):
        return [Tensor(a.astype(dtype), requires_grad=True) for a in self.arrays(seed)]


def case(id, fn, oracle, *shapes, positive=False, marks=()):
    """One row of a parametrize table: `case("add broadcast", lambda a, b: a + b, np.add, (3, 4), (4,))`."""
    return pytest.param(Case(fn, oracle, shapes, positive), id=id, marks=marks)


def check_forward(c, rtol=1e-9, atol=1e-12):
    inputs = c.tensors()
    expected = c.oracle(*[t.numpy() for t in inputs])
    out = c.fn(*inputs)
    assert out.shape == np.shape(expected), f"shape {out.shape}, oracle {np.shape(expected)}"
    np.testing.assert_allclose(out.numpy(), expected, rtol=rtol, atol=atol)


def check_gradient(c, mode="elements", **tolerances):
    tol = dict(ELEMENT_TOL if mode == "elements" else ADJOINT_TOL, **tolerances)
    assert autograd.gradcheck(c.fn, c.tensors(), mode=mode, **tol)


def check_float32(c):
    """float32 in, float32 out and back; the numbers agree with the float64 run."""
    runs = {}
    for dtype in (np.float32, np.float64):
        inputs = c.tensors(dtype)
        out = c.fn(*inputs)
        cotangent = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        out.backward(cotangent)
        runs[dtype] = out, inputs
    out32, inputs32 = runs[np.float32]
    out64, inputs64 = runs[np.float64]
    assert out32.dtype == np.float32, f"float32 inputs gave a {out32.dtype} output"
    for i, (x32, x64) in enumerate(zip(inputs32, inputs64)):
        assert x32.grad is not None, f"input {i} got no gradient"
        assert x32.grad.dtype == np.float32, f"input {i}: float32 input got a {x32.grad.dtype} gradient"
        if c.oracle is not None:
            assert_close_float32(x32.grad, x64.grad)
    if c.oracle is not None:
        assert_close_float32(out32.data, out64.data)


def assert_close_float32(actual, expected):
    """Equal up to float32 rounding, measured against the largest value."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)


def skip_unless_ci(reason):
    """Skip a test whose resource is missing here; in CI (CI set in the environment) the
    resource is part of the setup, so its absence is a failure, not a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it, so this is a failure there)")
    pytest.skip(reason)


@pytest.fixture(params=["fast", "plain"], autouse=True)
def both_kernel_modes(request):
    """Imported into a test module, runs each of its tests on the fast layer's twins and on
    the plain kernels (autograd.fast.enable / disable), restoring what was in use."""
    was_on = autograd.fast.enabled()
    (autograd.fast.enable if request.param == "fast" else autograd.fast.disable)()
    try:
        yield request.param
    finally:
        (autograd.fast.enable if was_on else autograd.fast.disable)()


def randn(*shape, seed=0, dtype=np.float64, requires_grad=True):
    """A standard-normal Tensor, for the tests that are not table rows."""
    data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return Tensor(data, requires_grad=requires_grad)
