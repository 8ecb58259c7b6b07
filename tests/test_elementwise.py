"""The fused element-wise kernels that a GPU runs (backend.elementwise), checked without one.

On CuPy each of these functions becomes one kernel through `cupy.fuse`; on
NumPy the very same function body runs as written. So the tests here check
(1) that the dispatch fuses for a non-NumPy array module and caches the
kernel, (2) that each body is traceable the way cupy.fuse traces it (no
shapes, no Python branch on a value, in-place updates where the caller
relies on them), and (3) that Adam's body is Algorithm 1. tests/gpu/
compares the GPU's results with the CPU's.
"""
import numpy as np
import pytest

from autograd import backend
from autograd.kernels import conv
from autograd.optim import _adam_update, _ema_update


# -----------------------------------------------------------------------------
# (1) dispatch
# -----------------------------------------------------------------------------

class FakeGPUModule:
    """Stands in for cupy: records what fuse() was asked to compile."""

    def __init__(self):
        self.fused = []

    def fuse(self, kernel_name=None):
        def decorate(fn):
            def kernel(*args):
                self.calls += 1
                return fn(*args)
            self.fused.append(kernel_name)
            return kernel
        self.calls = 0
        return decorate

    tanh = staticmethod(np.tanh)


def test_numpy_arrays_run_the_body_as_written():
    made = []

    @backend.elementwise
    def double_plus(xp):
        made.append(xp)
        return lambda a, b: 2 * a + b

    np.testing.assert_array_equal(double_plus(np.arange(3.0), np.ones(3)), [1.0, 3.0, 5.0])
    double_plus(np.arange(3.0), np.ones(3))
    assert made == [np], "the body is made once per array module, for NumPy without fusing"


def test_another_array_module_gets_one_fused_kernel_per_function(monkeypatch):
    fake = FakeGPUModule()
    monkeypatch.setattr(backend, "get_array_module", lambda *args: fake)

    @backend.elementwise
    def tanh_sum(xp):
        assert xp is fake
        return lambda a, b: xp.tanh(a) + b

    out = tanh_sum(np.zeros(2), np.ones(2))
    tanh_sum(np.zeros(2), np.ones(2))
    np.testing.assert_array_equal(out, [1.0, 1.0])
    assert fake.fused == ["tanh_sum"], "compiled once, named after the function"
    assert fake.calls == 2


# -----------------------------------------------------------------------------
# (2) traceable as cupy.fuse traces: symbolic values only
# -----------------------------------------------------------------------------

class Sym:
    """A value as cupy.fuse's tracer sees it: arithmetic works; its shape, truth
    value and number do not; in-place operators write to the variable itself."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def _op(self, other):
        return Sym(f"({self.name} . {getattr(other, 'name', other)})", self.log)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _op
    __truediv__ = __rtruediv__ = __neg__ = _op

    def _inplace(self, other):
        self.log.append(self.name)
        return self

    __iadd__ = __isub__ = __imul__ = __itruediv__ = _inplace

    @property
    def shape(self):
        raise NotImplementedError("cupy.fuse: `shape` is not supported")

    def __bool__(self):
        raise TypeError("cupy.fuse: cannot convert to a Python bool")

    __float__ = __int__ = __bool__


class SymModule:
    @staticmethod
    def tanh(x):
        return x._op(None)

    sqrt = tanh


KERNELS = [
    (conv._add_two, 3, 0, ["a0"]),     # a convolution's bias and `add`, into its output
    # Adam updates p, m and v in place: a GPU has no other way to hand them back.
    (_adam_update, 10, 0, ["m", "m", "v", "v", "p"]),
    (_ema_update, 4, 0, ["a0", "a0"]),  # the EMA's shadow, likewise
]


@pytest.mark.parametrize("kernel, n_args, n_out, writes", KERNELS,
                         ids=[k[0].__name__ for k in KERNELS])
def test_each_fused_body_is_element_wise_only(kernel, n_args, n_out, writes):
    log = []
    names = "p g m v".split() if kernel is _adam_update else [f"a{i}" for i in range(n_args)]
    args = [Sym(n, log) for n in names] + [Sym(f"s{i}", log) for i in range(n_args - len(names))]
    out = kernel.make(SymModule)(*args)
    results = () if out is None else (out if isinstance(out, tuple) else (out,))
    assert len(results) == n_out and all(isinstance(r, Sym) for r in results)
    assert log == writes


# -----------------------------------------------------------------------------
# (3) what the bodies compute
# -----------------------------------------------------------------------------

def test_adam_fused_update_is_algorithm_1_in_place():
    rng = np.random.default_rng(1)
    p, g = rng.standard_normal(50), rng.standard_normal(50)
    m, v = rng.standard_normal(50) * 0.1, rng.random(50) * 0.1
    b1, b2, lr, eps, t = 0.9, 0.999, 1e-3, 1e-8, 7
    m_want = b1 * m + (1 - b1) * g
    v_want = b2 * v + (1 - b2) * g * g
    p_want = p - lr * (m_want / (1 - b1 ** t)) / (np.sqrt(v_want / (1 - b2 ** t)) + eps)
    c2 = 1 - b2 ** t
    step_size, eps_hat = lr * np.sqrt(c2) / (1 - b1 ** t), eps * np.sqrt(c2)
    ids = [id(a) for a in (p, m, v)]
    _adam_update(p, g, m, v, b1, 1 - b1, b2, 1 - b2, step_size, eps_hat)
    assert [id(a) for a in (p, m, v)] == ids
    np.testing.assert_allclose(m, m_want, rtol=1e-14)
    np.testing.assert_allclose(v, v_want, rtol=1e-14)
    np.testing.assert_allclose(p, p_want, rtol=1e-12, atol=1e-15)


def test_set_tf32_sets_cupys_switch_and_reports_whether_cupy_can_take_it(monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    import os
    took = backend.set_tf32(True)
    assert os.environ["CUPY_TF32"] == "1"
    assert took == backend.cupy_available()
    backend.set_tf32(False)
    assert os.environ["CUPY_TF32"] == "0"
