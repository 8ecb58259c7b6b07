"""The one seam between NumPy and CuPy.

Every kernel in `autograd` asks this module for the array module of its inputs
(`xp`, as `cupy.get_array_module` does) and then calls only names that NumPy and
CuPy share, so one code path serves the CPU and the GPU. This is the only file
in the project that imports CuPy; everything else stays importable and testable
on a machine that has neither CuPy nor a GPU.
"""
import ctypes
import os

import numpy as np

try:  # CuPy is optional: `pip install tinyddpm[cuda12]` or `[cuda13]`
    import cupy
    import cupyx
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None
    cupyx = None


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy raises its own runtime errors
        return False


def cuda_unavailable_reason():
    """Why `.to("cuda")` cannot work here, in one sentence (None when it can)."""
    if cupy is None:
        return ("CuPy is not installed; install the GPU extra, e.g. "
                "pip install -e '.[cuda12]' (or '.[cuda13]')")
    if not cupy_available():
        return "CuPy is installed but no CUDA device is visible"
    return None


def get_array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for scalars)."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def is_cuda_array(a):
    return cupy is not None and isinstance(a, cupy.ndarray)


def device_of(a):
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cuda" if is_cuda_array(a) else "cpu"


def to_device(a, device):
    """Move an array to 'cpu' or 'cuda', copying only when it must change place."""
    if device == "cpu":
        return cupy.asnumpy(a) if is_cuda_array(a) else a
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot move to 'cuda': {reason}")
        return cupy.asarray(a)
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def data_address(a):
    """Where an array's first element lives (a device address for a CuPy array)."""
    return a.data.ptr if is_cuda_array(a) else a.__array_interface__["data"][0]


def to_numpy(a):
    """A host (NumPy) copy or view of any backend array."""
    return cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def array_module_for_device(device):
    if device == "cpu":
        return np
    to_device(np.zeros(0), device)  # raises the clear error when CUDA is unusable
    return cupy


def default_rng(seed=None, device="cpu"):
    """A seedable random generator on the given device.

    NumPy's and CuPy's `Generator` share the methods the project uses
    (`standard_normal`, `random`, `integers`), so code that receives a
    generator never needs to know where it draws.
    """
    return array_module_for_device(device).random.default_rng(seed)


# One global generator per device for ops that draw when no generator is
# passed (dropout). `manual_seed` resets them, so a seeded run repeats exactly.
_global_rngs = {}


def manual_seed(seed):
    """Seed the global generators of every device (those already made are replaced)."""
    _global_rngs.clear()
    _global_rngs["seed"] = seed


def seed_global_rng(seed, device="cpu"):
    """Replace one device's global generator with default_rng(seed) (seed: an int or a list of ints)."""
    _global_rngs[device] = default_rng(seed, device)


def fork_global_rngs(worker, entropy):
    """In forked worker process number `worker` (1, 2, ...): global generators of its own.

    A forked child starts with copies of its parent's generators, so without
    this its dropout masks would repeat the parent's. `entropy` is a number
    the parent drew from its own generator before the fork: the streams
    follow from the parent's seed (autograd.manual_seed) and differ from one
    block of workers to the next.
    """
    _global_rngs.clear()
    _global_rngs["seed"] = int(np.random.SeedSequence([entropy, 0x5EED, worker]).generate_state(1)[0])


def global_rng(device="cpu"):
    if device not in _global_rngs:
        seed = _global_rngs.get("seed")
        # Different streams per device from one seed: the device name is mixed in.
        _global_rngs[device] = default_rng(None if seed is None else [seed, len(device)], device)
    return _global_rngs[device]


# =============================================================================
# Host memory
# =============================================================================

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_host_memory_kept = False


def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for the next arrays (once per process).

    A training step allocates and frees the same full-size arrays again and
    again. By default glibc serves anything above a moving threshold with a
    fresh mmap and hands the top of its heap back to the OS once more than
    twice that is free, so the next step's arrays land on fresh pages: a page
    fault and a zeroed page per 4 KB written, serialized between threads. A
    group norm forward at 32 channels, 28x28, batch 64, on 2 threads took
    9.0 ms with 1329 page faults per call, 3.7 ms with 55 after this. What
    it costs: the process's resident memory stays near its peak instead of
    shrinking between steps (the peak of a mnist-tiny training step measured
    543 MB before, 545 MB after), and each thread's malloc arena may keep
    freed memory too. Arrays above 32 MB (glibc's ceiling for the threshold)
    still get their own mapping. The autograd kernels ask for this at their
    first CPU loop; TINYDDPM_MALLOC=default in the environment leaves glibc's
    defaults alone. Does nothing where the C library is not glibc; returns
    whether it applied. CuPy needs none of this: its memory pool already
    reuses device memory.
    """
    global _host_memory_kept
    if _host_memory_kept:
        return True
    if os.environ.get("TINYDDPM_MALLOC") == "default":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError, AttributeError):   # not glibc, or no confstr on this platform
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    _host_memory_kept = bool(ok)
    return _host_memory_kept


# NumPy's buffer size (values) while a CPU kernel's chunk multiplies or adds
# full-size rows and a per-row value (the group norm's x * a + c with a, c of
# shape (n, C, 1)). Such a broadcast stops NumPy from treating the rows as one
# long run, so by default its iterator copies several rows at a time into
# buffers of 8192 values and the per-row operand out value by value. With a
# buffer shorter than a row it works on the rows in place. A multiply by a
# per-row value, against one by a
# scalar (one thread, 250,000 values, tenth round): rows of 784 (28x28 maps)
# 2.6x as long by default, 1.3x with a 16-value buffer; rows of 196 2.6x and
# 2.1x; rows of 49 3.0x and 6.6x, so rows shorter than _NARROW_FROM keep the
# default. The setting is NumPy's, per thread. Not used for a convolution's
# time-embedding shift: added to one image's output in cache, the narrow
# buffer made those convolutions 1.01-1.08x as long (the set and restore cost
# about 4 us a chunk).
_NARROW_BUFFER = 16                     # NumPy wants a multiple of 16
_NARROW_FROM = 128


def narrow_buffer(row):
    """Set NumPy's buffer below a row of `row` values where that pays (see
    above); returns what to hand restore_buffer afterwards."""
    return np.setbufsize(_NARROW_BUFFER) if row >= _NARROW_FROM else None


def restore_buffer(old):
    if old is not None:
        np.setbufsize(old)


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
        from cupy._core import _routines_linalg as linalg
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
    from cupy_backends.cuda.libs import cublas
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
    import re
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", source)

