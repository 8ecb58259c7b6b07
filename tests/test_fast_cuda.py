"""The GPU's speed tools (autograd/fast/cuda.py), checked without a GPU.

- elementwise: on CuPy each decorated function becomes one kernel through
  `cupy.fuse`; on NumPy the very same body runs as written. So the tests
  check that the dispatch fuses for a non-NumPy array module and caches the
  kernel, that each body (the flat Adam and EMA updates of fast/optim.py) is
  traceable the way cupy.fuse traces it (no shapes, no Python branch on a
  value, in-place updates where the caller relies on them), and what the
  bodies compute.
- gemm is np.matmul on NumPy; _matrix_layout reads the strides cuBLAS is given.
- cuda_kernel compiles the kernels that the CUDA sources define, by name.
- set_tf32 sets CuPy's switch.
tests/gpu compares the GPU's results with the CPU's.
"""
import inspect
import os
import re

import numpy as np
import pytest

from autograd import backend
from autograd.fast import conv_gpu, cuda, norm_gpu
from autograd.fast.optim import _adam_flat, _ema_flat


# =============================================================================
# elementwise: the dispatch
# =============================================================================

class FakeGPUModule:
    """Stands in for cupy: records what fuse() was asked to compile."""

    def __init__(self):
        self.fused, self.calls = [], 0

    def fuse(self, kernel_name=None):
        def decorate(fn):
            def kernel(*args):
                self.calls += 1
                return fn(*args)
            self.fused.append(kernel_name)
            return kernel
        return decorate

    tanh = staticmethod(np.tanh)


def test_numpy_arrays_run_the_body_as_written():
    made = []

    @cuda.elementwise
    def double_plus(xp):
        made.append(xp)
        return lambda a, b: 2 * a + b

    np.testing.assert_array_equal(double_plus(np.arange(3.0), np.ones(3)), [1.0, 3.0, 5.0])
    double_plus(np.arange(3.0), np.ones(3))
    assert made == [np], "the body is made once per array module, for NumPy without fusing"


def test_another_array_module_gets_one_fused_kernel_per_function(monkeypatch):
    fake = FakeGPUModule()
    monkeypatch.setattr(cuda, "get_array_module", lambda *args: fake)

    @cuda.elementwise
    def tanh_sum(xp):
        assert xp is fake
        return lambda a, b: xp.tanh(a) + b

    out = tanh_sum(np.zeros(2), np.ones(2))
    tanh_sum(np.zeros(2), np.ones(2))
    np.testing.assert_array_equal(out, [1.0, 1.0])
    assert fake.fused == ["tanh_sum"], "compiled once, named after the function"
    assert fake.calls == 2


# =============================================================================
# elementwise: the bodies trace as cupy.fuse traces them (symbolic values only)
# =============================================================================

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
    def sqrt(x):
        return x._op(None)

    tanh = sqrt


# (kernel, argument names, the arrays it must write in place, in order)
KERNELS = [
    # Adam updates p, m and v in place: a GPU has no other way to hand them back.
    (_adam_flat, "p g m v b1 one_minus_b1 b2 one_minus_b2 step_size eps_hat", ["m", "m", "v", "v", "p"]),
    (_ema_flat, "shadow p d one_minus_d", ["shadow", "shadow"]),     # the EMA's shadow, likewise
]


@pytest.mark.parametrize("kernel, names, writes", KERNELS, ids=[k[0].__name__ for k in KERNELS])
def test_each_fused_body_is_element_wise_only_and_writes_in_place(kernel, names, writes):
    log = []
    out = kernel.make(SymModule)(*[Sym(n, log) for n in names.split()])
    assert out is None                     # nothing returned: the results are the in-place writes
    assert log == writes


# =============================================================================
# elementwise: what the bodies compute
# =============================================================================

def test_adam_flat_update_is_algorithm_1_in_place():
    rng = np.random.default_rng(1)
    p, g = rng.standard_normal(50), rng.standard_normal(50)
    m, v = rng.standard_normal(50) * 0.1, rng.random(50) * 0.1
    b1, b2, lr, eps, t = 0.9, 0.999, 1e-3, 1e-8, 7
    m_want = b1 * m + (1 - b1) * g
    v_want = b2 * v + (1 - b2) * g * g
    p_want = p - lr * (m_want / (1 - b1 ** t)) / (np.sqrt(v_want / (1 - b2 ** t)) + eps)
    # fast/optim.py folds both bias corrections into the step size and eps
    c2 = 1 - b2 ** t
    step_size, eps_hat = lr * np.sqrt(c2) / (1 - b1 ** t), eps * np.sqrt(c2)
    ids = [id(a) for a in (p, m, v)]
    _adam_flat(p, g, m, v, b1, 1 - b1, b2, 1 - b2, step_size, eps_hat)
    assert [id(a) for a in (p, m, v)] == ids
    np.testing.assert_allclose(m, m_want, rtol=1e-14)
    np.testing.assert_allclose(v, v_want, rtol=1e-14)
    np.testing.assert_allclose(p, p_want, rtol=1e-12, atol=1e-15)


def test_ema_flat_update_moves_the_shadow_towards_the_parameters_in_place():
    rng = np.random.default_rng(2)
    shadow, p = rng.standard_normal(30).astype(np.float32), rng.standard_normal(30).astype(np.float32)
    want = np.float32(0.9) * shadow + np.float32(0.1) * p
    held = shadow
    _ema_flat(shadow, p, np.float32(0.9), np.float32(1) - np.float32(0.9))
    assert shadow is held and shadow.dtype == np.float32
    np.testing.assert_allclose(shadow, want, rtol=1e-6, atol=1e-7)


# =============================================================================
# gemm and the layouts it hands cuBLAS
# =============================================================================

@pytest.mark.parametrize("a_shape, b_shape", [((4, 3), (2, 3, 5)), ((2, 4, 3), (3, 5)), ((4, 3), (3, 5))],
                         ids=["shared a", "shared b", "2-D"])
def test_gemm_on_numpy_writes_and_accumulates_into_out(a_shape, b_shape):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    want = a @ b
    out = np.full(want.shape, np.nan)
    assert cuda.gemm(a, b, out) is out
    np.testing.assert_allclose(out, want, rtol=1e-14)
    cuda.gemm(a, b, out, accumulate=True)
    np.testing.assert_allclose(out, 2 * want, rtol=1e-14)


@pytest.mark.parametrize("shape, strides, want", [
    ((3, 4), (16, 4), (False, 4, 0)),            # rows of 4 floats
    ((3, 4), (32, 4), (False, 8, 0)),            # rows padded to 8
    ((3, 4), (4, 12), (True, 3, 0)),             # columns of 3: a transposed view
    ((2, 3, 4), (48, 16, 4), (False, 4, 12)),    # batch stride 12 values
    ((2, 3, 4), (0, 16, 4), (False, 4, 0)),      # one matrix for every product: batch stride 0
    ((2, 3, 4), (-48, 16, 4), None),             # a batch read backwards: not for cuBLAS
    ((3, 4), (8, 8), None),                      # every other value: neither
])
def test_matrix_layout_reads_rows_columns_and_batch_strides(shape, strides, want):
    base = np.zeros(1000, np.float32)
    start = base[500:] if strides[0] < 0 else base
    a = np.lib.stride_tricks.as_strided(start, shape, strides)
    assert cuda._matrix_layout(a) == want


# =============================================================================
# CUDA C++ kernels: the names asked for are the names defined
# =============================================================================

@pytest.mark.parametrize("module", [conv_gpu, norm_gpu], ids=["conv_gpu", "norm_gpu"])
def test_every_kernel_asked_for_is_a_template_in_the_cuda_source(module):
    """cuda_kernel compiles name<float> and name<double> of every __global__
    kernel it finds; a kernel renamed in the CUDA text, or one that is not a
    template, would fail only on a GPU. Checked here from the texts."""
    defined = cuda._kernel_names(module._GPU_SOURCE)
    templates = re.findall(r"template\s*<typename T>\s*__global__\s+void\s+(\w+)\s*\(", module._GPU_SOURCE)
    asked = re.findall(r'cuda_kernel\(_GPU_SOURCE,\s*"(\w+)"', inspect.getsource(module))
    assert defined and templates == defined
    assert asked and set(asked) <= set(defined), f"asked for {sorted(set(asked) - set(defined))}"


# =============================================================================
# TF32
# =============================================================================

def test_set_tf32_sets_cupys_switch_and_reports_whether_cupy_can_take_it(monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.setattr(cuda, "_tf32", cuda._tf32)            # put back after the test
    took = cuda.set_tf32(True)
    assert os.environ["CUPY_TF32"] == "1" and cuda._tf32 is True
    assert took == backend.cupy_available()
    cuda.set_tf32(False)
    assert os.environ["CUPY_TF32"] == "0" and cuda._tf32 is False
