"""Attention on a CPU or a GPU: the plain kernels' faster twins.

Twins of attention_forward/attention_backward in autograd/kernels/attention.py
(whose docstring has the formulas). Every line of those is per example, so
on a CPU both directions go through the batch a few examples at a time on
the fast layer's threads, each chunk writing its own slices of the outputs
and working in place where the plain version makes temporaries. The
products go through cuda.gemm, which on a GPU reads the transposed views
(k^T, P^T, v^T) as they are, where CuPy's matmul would copy each first.
"""
from .. import backend
from ..backend import get_array_module
from .cuda import gemm
from .threads import parallel_for

# Bytes of attention weights P per chunk: a GPU takes the whole batch at once.
_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 1 << 40}


def _chunks(q, k):
    """(examples per chunk, number of chunks) for q (B, Nq, d), k (B, Nk, d)."""
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    nb = max(1, min(B, _CHUNK_BYTES[backend.device_of(q)] // max(1, Nq * Nk * q.itemsize)))
    if nb == B > 1 and backend.device_of(q) == "cpu" and B * Nq * Nk * q.itemsize >= _CHUNK_BYTES["cpu"] // 4:
        # Two chunks rather than one, so that two threads share the work even
        # where the whole batch's weights would fit one chunk.
        nb = -(-B // 2)
    return nb, -(-B // nb)


def softmax_forward(x, axis=-1, in_place=False):
    """exp(x - max) / sum: subtracting the max keeps exp from overflowing.

    One new array (or x itself, with in_place=True: attention's scores are
    not needed once they are weights), updated in place, exp then the
    division, since the attention weights are the largest arrays of an
    attention block.
    """
    xp = get_array_module(x)
    if in_place:
        x -= x.max(axis=axis, keepdims=True)
        e = x
    else:
        e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax_backward(grad, y, axis=-1):
    """dL/dx = y * (g - sum(g * y)): the Jacobian diag(y) - y y^T applied to g."""
    d = grad * y
    dot = d.sum(axis=axis, keepdims=True)
    d -= y * dot
    return d


def attention_forward(q, k, v):
    """-> (O, P): the output and the attention weights saved for backward."""
    xp = get_array_module(q, k, v)
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    B, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    out = xp.empty((B, Nq, v.shape[2]), dtype=q.dtype)
    p = xp.empty((B, Nq, Nk), dtype=q.dtype)
    nb, n_chunks = _chunks(q, k)

    def chunk(i, worker):
        c = slice(i * nb, (i + 1) * nb)
        s = gemm(q[c], k[c].transpose(0, 2, 1), p[c])         # scores (n, Nq, Nk)
        s *= scale
        gemm(softmax_forward(s, in_place=True), v[c], out[c])   # (n, Nq, dv)

    parallel_for(n_chunks, chunk, backend.device_of(q))
    return out, p


def attention_backward(grad, q, k, v, p):
    xp = get_array_module(grad, q, k, v)
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    # (empty_like would copy the inputs' layout, often a transposed view)
    dq, dk, dv = (xp.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
    nb, n_chunks = _chunks(q, k)

    def chunk(i, worker):
        c = slice(i * nb, (i + 1) * nb)
        gemm(p[c].transpose(0, 2, 1), grad[c], dv[c])          # (n, Nk, dv)
        dp = gemm(grad[c], v[c].transpose(0, 2, 1), xp.empty(p[c].shape, dtype=p.dtype))   # (n, Nq, Nk)
        ds = softmax_backward(dp, p[c])
        ds *= scale
        gemm(ds, k[c], dq[c])
        gemm(ds.transpose(0, 2, 1), q[c], dk[c])

    parallel_for(n_chunks, chunk, backend.device_of(q))
    return dq, dk, dv
