"""The GPU's speed tools: fused element-wise kernels, direct cuBLAS products,
CUDA C++ kernels compiled on first use, and the TF32 switch.

Each is written so that it also runs on NumPy arrays (`elementwise` runs the
function as written, `gemm` is np.matmul), which is how the CPU-only tests
check the arithmetic around them; tests/gpu checks them on CuPy.
"""
import os
import re

import numpy as np

from ..backend import cuda_library, cupy, cupy_available, get_array_module, is_cuda_array

# =============================================================================
# Fused element-wise kernels (GPU)
# =============================================================================

def elementwise(make):
    """Decorator: one element-wise function for both backends, one kernel on CuPy.

    `make(xp)` returns the function, written with arithmetic operators and
    xp's ufuncs only (no shapes, no Python branches on values). With NumPy
    arrays it runs as written, one pass over memory per operation, which is
    what the tests check against the CPU kernels. With CuPy arrays it goes
    through `cupy.fuse`, which traces it once per argument dtypes and
    compiles a single kernel: every input element is read once and every
    intermediate stays in a register, where the same chain of CuPy calls
    would launch one kernel and write one full-size array per operation.
    """
    made = {}

    def call(*args):
        xp = get_array_module(*args)
        fn = made.get(xp)
        if fn is None:
            fn = make(xp) if xp is np else xp.fuse(kernel_name=make.__name__)(make(xp))
            made[xp] = fn
        return fn(*args)

    call.make = make
    call.__name__ = call.__qualname__ = make.__name__
    call.__doc__ = make.__doc__
    return call


# =============================================================================
# TF32 matrix products (GPU)
# =============================================================================

_tf32 = os.environ.get("CUPY_TF32") == "1"     # what CuPy itself starts with


def set_tf32(enabled):
    """Let CuPy's float32 matrix products run on TF32 tensor cores (opt-in).

    TF32 keeps float32's range but rounds the inputs of each product to a
    10-bit mantissa (relative error ~1e-3 instead of ~1e-7), for several
    times the throughput on Ampere and later GPUs. Off by default, as in
    CuPy: the gradient checks and the CPU-vs-GPU tests assume full float32.
    CuPy reads its choice from the CUPY_TF32 environment variable at the
    first float32 product, so this sets the variable and, where this CuPy
    has it, also changes the choice it has already made.

    What it reaches: CuPy's 2-D products (cuBLAS's gemmEx with the chosen
    compute type: the linear layers) and every product of `gemm` below (the
    convolutions, attention). CuPy's batched `matmul` (3-D operands, as
    `einsum`'s) does not read the setting and stays full float32. Returns
    whether a usable GPU took it (the variable is set either way).
    """
    global _tf32
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    _tf32 = bool(enabled)
    if not cupy_available():
        return False
    try:
        linalg = cuda_library("cupy._core._routines_linalg")
        mode = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, mode)
    except (ImportError, AttributeError):  # a CuPy without this internal: the variable decides
        pass
    return True


# =============================================================================
# Matrix products with cuBLAS called directly (GPU)
# =============================================================================
# cuBLAS's numbers for these enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_GEMM_DEFAULT = -1
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
# cuBLAS's alpha and beta, read from host memory: 0 and 1 of each dtype, made once
_SCALAR_ARRAYS = {(np.dtype(d), v): np.full(1, v, d) for d in (np.float32, np.float64) for v in (0, 1)}
_SCALARS = {key: a.ctypes.data for key, a in _SCALAR_ARRAYS.items()}


def _matrix_layout(a):
    """(transposed, leading dimension, batch stride) in elements of a 2-D or
    3-D array whose last two axes are stored row by row (rows may be padded)
    or column by column; None when they are neither."""
    item = a.itemsize
    rows, cols = a.shape[-2:]
    s_row, s_col = (s // item for s in a.strides[-2:])
    batch = a.strides[0] // item if a.ndim == 3 else 0
    if batch < 0:                                    # (x[::-1]) cuBLAS does not promise to take it
        return None
    if s_col == 1 and s_row >= max(1, cols):
        return False, max(1, s_row), batch
    if s_row == 1 and s_col >= max(1, rows):
        return True, max(1, s_col), batch
    return None


def gemm(a, b, out, accumulate=False):
    """out = a @ b, or out += a @ b with accumulate=True, written into `out`.

    a (M, K) or (n, M, K), b (K, N) or (n, K, N), out (M, N) or (n, M, N); a
    2-D operand is the same matrix for every one of the n products. On NumPy
    this is np.matmul. On CuPy it calls cuBLAS's strided batched product
    itself, because CuPy's `matmul` copies every operand that is not
    C-contiguous (a transposed view, a slice of rows) and runs a broadcast
    operand (the weights, the same for every image) through a table of
    per-matrix addresses it builds on the device: three more kernels and a
    copy per call, in a training step that is bound by how fast the host
    issues kernels. Here a transposed view costs nothing (cuBLAS reads it
    transposed), the weights get a batch stride of 0, and accumulate=True
    adds into `out` (cuBLAS's beta = 1) instead of needing a sum afterwards.
    Operands whose last two axes are neither rows nor columns of memory
    are copied first, and an `out` not stored row by row gets the product
    through a copy. `out` must not overlap `a` or `b` (cuBLAS reads and
    writes in place; np.matmul would copy).
    """
    if not is_cuda_array(out):
        if accumulate:
            out += np.matmul(a, b)
        else:
            np.matmul(a, b, out=out)
        return out
    cublas = cuda_library("cupy_backends.cuda.libs.cublas")
    dtype = out.dtype
    if dtype not in _CUDA_R or a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"gemm: float32 or float64 operands of one dtype, got {a.dtype}, {b.dtype}, {dtype}")
    M, N = out.shape[-2:]
    K = a.shape[-1]
    if a.shape[-2] != M or b.shape[-2] != K or b.shape[-1] != N:
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} do not give {out.shape}")
    n = out.shape[0] if out.ndim == 3 else 1
    layouts = []
    for x in (a, b):
        if x.ndim == 3 and x.shape[0] != n:
            raise ValueError(f"gemm: {x.shape[0]} matrices for {n} products")
        layout = _matrix_layout(x)
        if layout is None:
            x = cupy.ascontiguousarray(x)
            layout = _matrix_layout(x)
        layouts.append((x, layout))
    (a, (ta, lda, sa)), (b, (tb, ldb, sb)) = layouts
    c_layout = _matrix_layout(out)
    if c_layout is None or c_layout[0]:                 # cuBLAS writes rows: go through a copy
        product = gemm(a, b, cupy.empty(out.shape, dtype=dtype))
        if accumulate:
            out += product
        else:
            out[...] = product
        return out
    _, ldc, sc = c_layout
    # cuBLAS counts in columns: the row-major out (M, N) is the column-major
    # out^T (N, M) = b^T a^T, so b goes first, each read transposed or not.
    if dtype == np.float64:
        compute = _COMPUTE_64F
    else:
        compute = _COMPUTE_32F_FAST_TF32 if _tf32 else _COMPUTE_32F
    t = _CUDA_R[dtype]
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(), _OP_T if tb else _OP_N, _OP_T if ta else _OP_N,
        N, M, K, _SCALARS[dtype, 1],
        b.data.ptr, t, ldb, sb, a.data.ptr, t, lda, sa,
        _SCALARS[dtype, int(accumulate)], out.data.ptr, t, ldc, sc, n, compute, _GEMM_DEFAULT)
    return out


# =============================================================================
# Kernels written in CUDA C++ (GPU)
# =============================================================================

_compiled = {}


def cuda_kernel(source, name, dtype):
    """The kernel template `name` of CUDA C++ `source`, made for `dtype`
    (float or double), compiled on first use and kept.

    Where one kernel of our own does what a chain of CuPy calls would (a
    group norm's statistics, normalization and SiLU in one pass per group;
    the gather of a convolution's patches), the host issues one launch
    instead of a dozen. Call the result as kernel(grid, block, args), scalars
    as NumPy scalars of the C type (np.int32 for int, np.float64 for double).
    """
    ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(dtype)]
    key = (source, name, ctype)
    fn = _compiled.get(key)
    if fn is None:
        module = _compiled.get(source)
        if module is None:
            names = [f"{n}<{t}>" for n in _kernel_names(source) for t in ("float", "double")]
            module = _compiled[source] = cupy.RawModule(code=source, options=("-std=c++14",),
                                                        name_expressions=names)
        fn = _compiled[key] = module.get_function(f"{name}<{ctype}>")
    return fn


def _kernel_names(source):
    """The names of the `template <typename T> __global__ void name(` kernels in source."""
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", source)

