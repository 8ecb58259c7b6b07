"""Convolution and nearest upsampling on raw arrays (NumPy or CuPy through `xp`).

Layout is NCHW, weights (C_out, C_in, kH, kW), as PyTorch. CuPy 14 has no
cuDNN module, so both backends do the same thing: gather every kH x kW patch
into a column (im2col) and multiply by the weight matrix. How differs: the
CPU's version (most of this file) is shaped by a core's cache; the GPU's
("On a GPU", at the end) by the cost of each kernel launch.

With y = conv(x, w):   y[b, o, i, j] = sum_{c, u, v} w[o, c, u, v] x_pad[b, c, s*i+u, s*j+v]
- dL/dw is dL/dy times the same patch matrix (one matrix product), and
- dL/dx, for stride 1, is itself a convolution: of dL/dy, padded by k-1-p,
  with the weights flipped in space and C_in/C_out swapped (each input pixel
  collects dL/dy over the outputs whose patch held it). For stride > 1 the
  patch gradients are added back into place, one strided add per offset.

How the fast version is laid out, and why (measured in benchmarks/bench_conv.py):
- The patch matrix is (C*kh*kw, images*pixels): one row per (channel, offset),
  images side by side, so a chunk of images needs one large matrix product
  and its rows are long contiguous copies (fast) instead of kW-float pieces.
- For stride 1 each row is one run of memory: reading the image as a flat
  array of rows, the pixels (i, j) and (i, j + 1) of a patch row are
  neighbours. Where the output is no wider than the input (every stride-1
  convolution of the UNet, with "same" padding) the rows are not padded at
  the sides at all: the patch values whose read wrapped round into the row
  above or below (output column 0 at kernel column 0, column W-1 at kernel
  column 2, for 3x3) are set to zero after the gather, one strided fill per
  such kernel column. With "same" padding the patch matrix then has exactly
  one column per output pixel (otherwise the W - Wo extra columns of each
  row are dropped), the chunk is copied into its buffer as whole rows, and
  a chunk of one image is multiplied straight into the output (tenth round:
  the forward took 0.82-0.97 of its time before on one core). Where the
  output is wider than the input (padding above (k-1)/2) the rows are
  padded on the left to a width R: a patch over the right edge of row i
  reads the left padding of row i + 1, zero too, and the R - Wo extra
  columns are dropped.
- Images go through in chunks so the patch matrix stays in cache and the
  memory never holds it for the whole batch (about 9x the input).
- When the backward needs both dL/dx and dL/dw (stride 1), both come from
  the one patch matrix of dL/dy (`_conv2d_backward_shared_patches`), so no
  second one, of x, is gathered.

`conv2d_reference` (direct loops over the kernel) is the readable version and
the tests' oracle.
"""
from .. import backend
from ..backend import get_array_module
from ..parallel import Scratch, parallel_for

# Bytes of patch matrix per chunk of images (at least one image): about 1 MB
# keeps it in a CPU core's L2 while the matrix product reads it (measured
# 10-25% faster than 4 MB and up); a GPU wants few, large products.
_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 256 << 20}
# Runs of chunks in dL/dw's backward, each with its own partial sum (see there):
# enough for a few threads to share, few enough that the partial sums stay small.
_SUMS = 8


def _pad(x, padding):
    if padding == 0:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def output_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _im2col(x, kh, kw, stride, padding, Ho, Wo, nb, ones=False):
    """-> (im2col, row): im2col(b0, n, worker) is the patch matrix (C*kh*kw, n*Ho*row)
    of images b0 .. b0+n-1 (n <= nb), in a buffer of thread `worker` reused chunk after chunk.
    With ones=True it has one more row, all ones: a weight matrix with the bias
    as its last column then adds the bias inside the product.

    Per thread, three buffers are made once: the chunk zero-padded, whose
    padding stays zero (only the interior is ever written), so padding costs
    one copy of the chunk, which stays in cache for the im2col that reads it
    next; the strided view (C, kh, kw, images, Ho, row) of its patches (no
    copy); and the patch matrix itself. For stride 1 the last two axes of the
    view are one flat run of Ho*row values (see _row). Where the output is no
    wider than the input ("same" padding, as every stride-1 convolution of
    the UNet), row = W: the chunk is padded above and below each image only,
    so its copy in is whole rows, and the few patch values whose read wrapped
    round into the row above or below (a kernel column hanging over the left
    or right edge) are set to zero after the gather, one strided fill per
    such kernel column. Otherwise row = R, rows padded on the left so that
    the wrapped reads land on zeros, and R - Wo garbage columns to drop.
    """
    xp = get_array_module(x)
    B, C, H, W = x.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    row = _row(W, kw, stride, padding, Wo)
    wrap = stride == 1 and row == W                 # unpadded sides, wrapped reads zeroed
    K = C * kh * kw
    extra = 1 if ones else 0

    def make():
        if wrap:
            # `padding` values before the first image and kw-1-padding after the
            # last: the reads that wrap past either end (zeroed afterwards).
            before, after = padding, max(0, kw - 1 - padding)
            flat = xp.zeros(before + nb * C * Hp * W + after, dtype=x.dtype)
            x_pad = flat[before:before + nb * C * Hp * W].reshape(nb, C, Hp, W)
            sb, sc, sh, sw = x_pad.strides
            # view[c, u, v, b, i, j] = x_pad[b, c] read flat at (i + u) W + j + v - padding
            view = xp.lib.stride_tricks.as_strided(flat, (C, kh, kw, nb, Ho, W), (sc, sh, sw, sb, sh, sw))
        else:
            x_pad = xp.zeros((nb, C, Hp + 1, row if stride == 1 else Wp), dtype=x.dtype)
            sb, sc, sh, sw = x_pad.strides
            view = xp.lib.stride_tricks.as_strided(
                x_pad, (C, kh, kw, nb, Ho, row), (sc, sh, sw, sb, stride * sh, stride * sw))
        cols = xp.empty((K + extra) * nb * Ho * row, dtype=x.dtype)
        cols[K * nb * Ho * row:] = 1            # a full chunk's row of ones, never overwritten
        return x_pad, view, cols

    bufs = Scratch(make)
    left = 0 if wrap else padding                   # where a row's data starts in x_pad

    def im2col(b0, n, worker):
        x_pad, view, cols = bufs[worker]
        x_pad[:n, :, padding:padding + H, left:left + W] = x[b0:b0 + n]
        size = n * Ho * row
        c = cols[:K * size].reshape(C, kh, kw, n, Ho, row)             # contiguous for any n
        c[...] = view[:, :, :, :n]
        if wrap:
            # Output column j at kernel column v reads input column j + v - padding.
            for v in range(kw):
                if v < padding:
                    c[:, :, v, :, :, :padding - v] = 0
                elif v > padding:
                    c[:, :, v, :, :, max(0, W - (v - padding)):] = 0
        if extra and n < nb:
            cols[K * size:(K + 1) * size] = 1   # a shorter chunk's ones row sits earlier
        return cols[:(K + extra) * size].reshape(K + extra, size)

    return im2col, row


def _row(W, kw, stride, padding, Wo):
    """Length of a patch-matrix row per output row (see _im2col): W where a
    stride-1 output is no wider than the input, else (stride 1) the width R
    of rows padded on the left, and Wo for larger strides."""
    if stride != 1:
        return Wo
    if Wo <= W:
        return W
    return _padded_row(W, kw, padding, Wo)


def _padded_row(W, kw, padding, Wo):
    """The width R of rows padded on the left only, read as flat runs: a patch
    over the right edge of one row reads the next row's left padding, zero."""
    # R >= W + padding: each row starts with `padding` zeros, and a kept output
    # reads at most padded column W + 2 padding - 1, which is at worst among the
    # next row's left zeros. R >= Wo: every kept output column fits in a row.
    # R >= kw - 1: the last patch run, which starts kw - 1 into the spare zero
    # row below the image, ends inside it.
    return max(W + padding, Wo, kw - 1)


def _chunk(B, rows_per_image, itemsize, x):
    per_image = rows_per_image * itemsize
    return max(1, min(B, _CHUNK_BYTES[backend.device_of(x)] // max(1, per_image)))


def _in_runs(n_chunks, chunk, device):
    """chunk(i, worker, r) for every chunk i, in n_runs = min(n_chunks, _SUMS) runs
    of consecutive chunks, run r on one thread: each run adds its dL/dw and dL/db
    terms into its own partial sum (index r), and the caller adds those in run
    order after the loop, so that the sums depend neither on the number of
    threads nor on which finished first (the caller sizes them with _n_runs)."""
    n_runs = _n_runs(n_chunks)

    def run(r, worker):
        for i in range(r * n_chunks // n_runs, (r + 1) * n_chunks // n_runs):
            chunk(i, worker, r)

    parallel_for(n_runs, run, device)


def _n_runs(n_chunks):
    return min(n_chunks, _SUMS)


def conv2d_forward(x, w, stride=1, padding=0, bias=None, add=None):
    """x (B, C, H, W), w (O, C, kh, kw), bias (O,) or None -> y (B, O, Ho, Wo).

    With `add` (an array that broadcasts to y's shape), y = conv(x) + add: the
    addition is made while each chunk's output is written, in cache and on
    the thread pool, instead of in a pass of its own over y (the UNet's
    time-embedding shift and its residual connections).
    """
    if backend.is_cuda_array(x):
        return conv2d_forward_gpu(x, w, stride, padding, bias, add)
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    b_col = None if bias is None else bias.reshape(O, 1, 1, 1)
    if add is not None:
        add = xp.broadcast_to(add, (B, O, Ho, Wo))                      # a view: sliced per chunk
    if kh == kw == 1 and stride == 1 and padding == 0:
        return _conv1x1_forward(x, w, b_col, add)
    if stride == 1 and _output_side(x, O, Ho * Wo):
        return _conv2d_forward_output_side(x, w, padding, b_col, add)
    K = C * kh * kw
    w2 = w.reshape(O, K)
    if bias is not None:
        # The bias as one more weight column, against a patch row of ones: added
        # inside the product, no pass of its own over the output.
        w2 = xp.concatenate([w2, bias.reshape(O, 1).astype(w2.dtype, copy=False)], axis=1)
    y = xp.empty((B, O, Ho, Wo), dtype=x.dtype)
    row = _row(W, kw, stride, padding, Wo)
    nb = _chunk(B, K * Ho * row, x.itemsize, x)
    im2col, _ = _im2col(x, kh, kw, stride, padding, Ho, Wo, nb, ones=bias is not None)

    def chunk(i, worker):
        b0 = i * nb
        n = min(nb, B - b0)
        cols = im2col(b0, n, worker)
        if n == 1 and row == Wo:                # one image, no columns to drop: straight into y
            yb = y[b0]
            xp.matmul(w2, cols, out=yb.reshape(O, Ho * Wo))
            if add is not None:
                yb += add[b0]
            return
        yc = xp.matmul(w2, cols).reshape(O, n, Ho, row)
        _write(y, b0, n, yc[:, :, :, :Wo].transpose(1, 0, 2, 3), add)

    parallel_for(-(-B // nb), chunk, backend.device_of(x))
    return y


def _write(y, b0, n, chunk, add):
    """y[b0:b0+n] = chunk (+ add[b0:b0+n]), in one pass."""
    if add is None:
        y[b0:b0 + n] = chunk
    else:
        get_array_module(y).add(chunk, add[b0:b0 + n], out=y[b0:b0 + n])


def _output_side(x, O, out_pixels):
    """Whether a stride-1 convolution of x to O channels runs output-side (see there)."""
    return x.shape[1] >= 2 * O and out_pixels >= 28 * 28 and backend.device_of(x) == "cpu"


def _conv1x1_forward(x, w, b_col=None, add=None):
    """A 1x1 convolution is a matrix product over the channel axis, image by image."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O = w.shape[0]
    w2, x3 = w.reshape(O, C), x.reshape(B, C, H * W)
    y = xp.empty((B, O, H * W), dtype=x.dtype)
    nb = _chunk(B, (C + O) * H * W, x.itemsize, x)

    def chunk(i, worker):
        yc = xp.matmul(w2, x3[i * nb:(i + 1) * nb], out=y[i * nb:(i + 1) * nb])
        if b_col is not None:
            yc += b_col.reshape(O, 1)
        if add is not None:                                             # while yc is in cache
            yc4 = yc.reshape(-1, O, H, W)
            yc4 += add[i * nb:(i + 1) * nb]

    parallel_for(-(-B // nb), chunk, backend.device_of(x))
    return y.reshape(B, O, H, W)


def _conv1x1_backward(grad, x, w, need_x, need_w, need_b):
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O = w.shape[0]
    g3, x3, w2 = grad.reshape(B, O, H * W), x.reshape(B, C, H * W), w.reshape(O, C)
    nb = _chunk(B, (C + O) * H * W, x.itemsize, x)
    n_chunks = -(-B // nb)
    n_runs = _n_runs(n_chunks)                      # partial sums (_in_runs)
    dx = xp.empty_like(x3) if need_x else None
    dw_parts = xp.zeros((n_runs, O, C), dtype=grad.dtype) if need_w else None
    db_parts = xp.zeros((n_runs, O), dtype=grad.dtype) if need_b else None

    def chunk(i, worker, r):
        g, xc = g3[i * nb:(i + 1) * nb], x3[i * nb:(i + 1) * nb]
        if need_x:
            xp.matmul(w2.T, g, out=dx[i * nb:(i + 1) * nb])                # dL/dx = w^T dL/dy
        if need_w:
            dw_parts[r] += xp.matmul(g, xc.transpose(0, 2, 1)).sum(axis=0)   # dL/dy x^T
        if need_b:
            db_parts[r] += g.sum(axis=(0, 2))

    _in_runs(n_chunks, chunk, backend.device_of(x))
    return (dx.reshape(x.shape) if need_x else None,
            dw_parts.sum(axis=0).reshape(w.shape) if need_w else None,
            db_parts.sum(axis=0) if need_b else None)


def _conv2d_forward_output_side(x, w, padding, b_col=None, add=None):
    """Stride 1 without im2col: all kh*kw weight slices times the padded input
    in one product, then the kh*kw shifted outputs added up.

    y[o, i, j] = sum_{u, v} (w[:, :, u, v] @ x_pad)[o, i + u, j + v]. The copy
    this makes is kh*kw times the output instead of kh*kw times the input, so
    it pays where C_in is well above C_out: measured on one CPU core, batch 64,
    1.35x faster at 96->32 and 1.15x at 64->32 on 28x28 maps, 1.9x at the
    UNet's last 32->1, but even or up to 1.4x slower at 14x14 and smaller, and
    slower at C_in = C_out (the product has ~10% more columns here: it runs
    over the padding too). Hence the dispatch in conv2d_forward. (Against the
    im2col path without side padding, tenth round, two threads: 1.18x faster
    at 96->32, 2.7x at 32->1, even at 64->32.) It keeps rows padded on the
    left (_padded_row), so that the shifted additions read zeros past an edge.
    """
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Hp = H + 2 * padding
    Ho, Wo = Hp - kh + 1, W + 2 * padding - kw + 1
    R = _padded_row(W, kw, padding, Wo)      # rows padded on the left, read as flat runs
    L = (Hp + 1) * R                         # one spare zero row: the last shifts read kw-1 past the end
    w_all = w.transpose(2, 3, 0, 1).reshape(kh * kw * O, C)              # rows (u, v, o)
    y = xp.empty((B, O, Ho, Wo), dtype=x.dtype)
    nb = _chunk(B, kh * kw * O * L, x.itemsize, x)
    # Channels first, so that a chunk's (C, n * L) matrix is contiguous; the
    # last, shorter chunk gets its own buffer (a view of the first would not be).
    pad_bufs = Scratch(lambda: xp.zeros((C, nb, Hp + 1, R), dtype=x.dtype))

    def chunk(i, worker):
        b0 = i * nb
        n = min(nb, B - b0)
        x_pad = pad_bufs[worker] if n == nb else xp.zeros((C, n, Hp + 1, R), dtype=x.dtype)
        x_pad[:, :, padding:padding + H, padding:padding + W] = x[b0:b0 + n].transpose(1, 0, 2, 3)
        z = xp.matmul(w_all, x_pad.reshape(C, n * L)).reshape(kh, kw, O, n, L)
        # As flat rows of width R, output pixel q = i R + j takes z[u, v] at q + u R + v;
        # the R - Wo wrapped columns are dropped at the end.
        first = z[0, 0, :, :, :Ho * R]                                  # (O, n, Ho*R)
        if b_col is None:
            acc = first.copy()
        else:                                                           # in the output's dtype
            acc = first + b_col.reshape(O, 1, 1).astype(first.dtype, copy=False)
        for u in range(kh):
            for v in range(kw):
                if u or v:
                    off = u * R + v
                    acc += z[u, v, :, :, off:off + Ho * R]
        acc = acc.reshape(O, n, Ho, R)
        _write(y, b0, n, acc[:, :, :, :Wo].transpose(1, 0, 2, 3), add)

    parallel_for(-(-B // nb), chunk, backend.device_of(x))
    return y


def conv2d_backward(grad, x, w, stride=1, padding=0, need_x=True, need_w=True, need_b=False):
    """Gradients (dx, dw, db) of conv2d_forward for dL/dy = grad (B, O, Ho, Wo).

    Each is None unless asked for (need_x, need_w, need_b).
    """
    if backend.is_cuda_array(x):
        return conv2d_backward_gpu(grad, x, w, stride, padding, need_x, need_w, need_b)
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = grad.shape[2:]
    dx = dw = db = None
    if kh == kw == 1 and stride == 1 and padding == 0:
        return _conv1x1_backward(grad, x, w, need_x, need_w, need_b)

    if need_x and stride == 1 and kh == kw and padding <= kh - 1:
        # Each input pixel gathers dL/dy from the outputs whose patches held it: a
        # full convolution of dL/dy with the weights flipped and C_in/C_out swapped
        # (square kernels only, since conv2d_forward pads both sides alike).
        w_flip = xp.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (C, O, kh, kw)
        if need_w and not _output_side(grad, C, H * W):
            return _conv2d_backward_shared_patches(grad, x, w_flip, padding, need_b)
        dx = conv2d_forward(grad, w_flip, 1, kh - 1 - padding)
    if not (need_w or need_b or (need_x and dx is None)):
        return dx, dw, db

    K = C * kh * kw
    Hp, Wp = H + 2 * padding, W + 2 * padding
    row = _row(W, kw, stride, padding, Wo)
    nb = _chunk(B, K * Ho * row, x.itemsize, x)
    n_chunks = -(-B // nb)
    im2col, _ = _im2col(x, kh, kw, stride, padding, Ho, Wo, nb)
    # dL/dy with one row per column of the patch matrix (channels last: the
    # product cols @ g then runs faster in OpenBLAS than g^T @ cols^T); the
    # extra columns stay zero, so the garbage patches they stand for add nothing.
    g_bufs = Scratch(lambda: xp.zeros((nb, Ho, row, O), dtype=grad.dtype))
    w2 = w.reshape(O, K)
    n_runs = _n_runs(n_chunks)                      # partial sums (_in_runs)
    dw_parts = xp.zeros((n_runs, K, O), dtype=grad.dtype) if need_w else None   # dL/dw transposed
    db_parts = xp.zeros((n_runs, O), dtype=grad.dtype) if need_b else None
    # dL/db as ones @ dL/dy: a column sum by the BLAS, ~8x faster than sum(axis=0) here.
    ones = xp.ones(nb * Ho * row, dtype=grad.dtype) if need_b else None
    if need_x and dx is None:
        dx_pad = xp.zeros((B, C, Hp, Wp), dtype=grad.dtype)

    def chunk(i, worker, r):
        b0 = i * nb
        n = min(nb, B - b0)
        g = g_bufs[worker][:n]
        g[:, :, :Wo] = grad[b0:b0 + n].transpose(0, 2, 3, 1)
        g2 = g.reshape(n * Ho * row, O)
        if need_b:
            db_parts[r] += xp.matmul(ones[:n * Ho * row], g2)          # sum over pixels
        if need_w:
            dw_parts[r] += xp.matmul(im2col(b0, n, worker), g2)
        if need_x and dx is None:
            dcols = xp.matmul(w2.T, g2.T).reshape(C, kh, kw, n, Ho, row)   # patch gradients
            for u in range(kh):
                for v in range(kw):
                    # Output pixel (i, j) read input pixel (s*i+u, s*j+v) at offset (u, v).
                    dx_pad[b0:b0 + n, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride] += \
                        dcols[:, u, v, :, :, :Wo].transpose(1, 0, 2, 3)

    _in_runs(n_chunks, chunk, backend.device_of(x))
    if need_x and dx is None:
        dx = dx_pad[:, :, padding:padding + H, padding:padding + W].copy()
    if need_w:
        dw = dw_parts.sum(axis=0).T.reshape(w.shape)
    if need_b:
        db = db_parts.sum(axis=0)
    return dx, dw, db


def _conv2d_backward_shared_patches(grad, x, w_flip, padding, need_b):
    """(dx, dw, db) for stride 1 from ONE patch matrix per chunk: that of dL/dy.

    dL/dx is the convolution of dL/dy padded by q = k-1-p with the flipped
    weights w_flip (C, O, k, k), as in conv2d_backward. Its patch matrix P, row
    (o, u, v) and column (image, i, j), holds dL/dy[o, i+u-q, j+v-q], so
        sum over columns of P[(o, u, v)] x[c, i, j] = dL/dw[o, c, k-1-u, k-1-v]
    (substitute i' = i+u-q in the definition of dL/dw). dL/dw is then one
    product of P with the chunk of x, laid out as P's columns (the extra
    columns of each row zero), instead of a second patch matrix, of x, nine
    times its size: each chunk's dL/dy is gathered once and feeds both
    products while in cache. dL/db: with "same" padding (output as large as
    the input) the centre offset's rows (u = v = q) hold dL/dy itself, summed
    over the real columns; otherwise they miss its border, and it is summed
    directly.
    """
    xp = get_array_module(grad, x, w_flip)
    B, C, H, W = x.shape
    O, k = w_flip.shape[1], w_flip.shape[2]
    q = k - 1 - padding
    K = O * k * k
    w2 = w_flip.reshape(C, K)
    row = _row(grad.shape[3], k, 1, q, W)
    nb = _chunk(B, K * H * row, x.itemsize, x)
    n_chunks = -(-B // nb)
    im2col, _ = _im2col(grad, k, k, 1, q, H, W, nb)
    # x channels last (one row per column of P: the product P @ x then runs
    # 1.4-1.7x faster in OpenBLAS than x @ P^T); the extra columns stay zero.
    x_bufs = Scratch(lambda: xp.zeros((nb, H, row, C), dtype=x.dtype))
    dx = xp.empty(x.shape, dtype=grad.dtype)                           # as the dL/dx convolution would give
    n_runs = _n_runs(n_chunks)                      # partial sums (_in_runs)
    dw_parts = xp.zeros((n_runs, K, C), dtype=grad.dtype)
    db_from_centre = need_b and grad.shape[2:] == x.shape[2:]
    db_parts = xp.zeros((n_runs, O), dtype=grad.dtype) if db_from_centre else None
    if db_from_centre:
        real = xp.zeros((nb, H, row), dtype=x.dtype)                    # 1 on the real columns
        real[:, :, :W] = 1
        real = real.reshape(-1)

    def chunk(i, worker, r):
        b0 = i * nb
        n = min(nb, B - b0)
        cols = im2col(b0, n, worker)                                    # (K, n*H*row)
        if n == 1 and row == W:                 # one image, no columns to drop: straight into dx
            xp.matmul(w2, cols, out=dx[b0].reshape(C, H * W))
        else:
            dxc = xp.matmul(w2, cols).reshape(C, n, H, row)
            dx[b0:b0 + n] = dxc[:, :, :, :W].transpose(1, 0, 2, 3)
        xc = x_bufs[worker][:n]
        xc[:, :, :W] = x[b0:b0 + n].transpose(0, 2, 3, 1)
        dw_parts[r] += xp.matmul(cols, xc.reshape(-1, C))
        if db_from_centre:
            centre = cols.reshape(O, k, k, -1)[:, q, q]                 # dL/dy, extra columns included
            db_parts[r] += xp.matmul(centre, real[:n * H * row])

    _in_runs(n_chunks, chunk, backend.device_of(x))
    dw = dw_parts.sum(axis=0).reshape(O, k, k, C)[:, ::-1, ::-1].transpose(0, 3, 1, 2)
    db = None
    if need_b:
        db = db_parts.sum(axis=0) if db_from_centre else grad.sum(axis=(0, 2, 3))
    return dx, xp.ascontiguousarray(dw), db


def conv2d_reference(x, w, stride=1, padding=0):
    """The obvious convolution: a sum over kernel offsets of shifted, strided slices."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    x_pad = _pad(x, padding)
    y = xp.zeros((B, O, Ho, Wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            patch = x_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride]  # (B, C, Ho, Wo)
            y += xp.einsum("bchw,oc->bohw", patch, w[:, :, u, v])
    return y


def upsample_nearest2d_forward(x, scale):
    """Each pixel becomes a scale x scale block: (B, C, H, W) -> (B, C, sH, sW).

    Written as scale^2 strided copies of x, a few images at a time: 2.5x
    faster on a CPU than reshaping a broadcast view (whose copy walks six
    axes, two of them of length scale).
    """
    xp = get_array_module(x)
    B, C, H, W = x.shape
    y = xp.empty((B, C, H * scale, W * scale), dtype=x.dtype)
    nb = _chunk(B, C * H * W * scale * scale, x.itemsize, x)

    def chunk(k, worker):
        for i in range(scale):
            for j in range(scale):
                y[k * nb:(k + 1) * nb, :, i::scale, j::scale] = x[k * nb:(k + 1) * nb]

    parallel_for(-(-B // nb), chunk, backend.device_of(x))
    return y


def upsample_nearest2d_forward_reference(x, scale):
    """The same blocks as a broadcast view, reshaped (one copy)."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    y = xp.broadcast_to(x[:, :, :, None, :, None], (B, C, H, scale, W, scale))
    return y.reshape(B, C, H * scale, W * scale)


def upsample_nearest2d_backward(grad, scale):
    """Each input pixel was copied to a block, so its gradient is the block's sum.

    Summed as scale^2 strided views of dL/dy added into dL/dx, a few images at a
    time on the thread pool as the forward: a reduction over the two short
    block axes (`.sum(axis=(3, 5))`) is several times slower on a CPU.
    """
    xp = get_array_module(grad)
    B, C, Hs, Ws = grad.shape
    g = xp.empty((B, C, Hs // scale, Ws // scale), dtype=grad.dtype)
    nb = _chunk(B, C * Hs * Ws, grad.itemsize, grad)

    def chunk(k, worker):
        b = slice(k * nb, (k + 1) * nb)
        views = [grad[b, :, i::scale, j::scale] for i in range(scale) for j in range(scale)]
        if len(views) == 1:                                             # scale 1: a copy
            g[b] = views[0]
            return
        gc = xp.add(views[0], views[1], out=g[b])
        for v in views[2:]:
            gc += v

    parallel_for(-(-B // nb), chunk, backend.device_of(grad))
    return g


def upsample_nearest2d_backward_reference(grad, scale):
    """The same sum written as a reduction over each block."""
    B, C, Hs, Ws = grad.shape
    return grad.reshape(B, C, Hs // scale, scale, Ws // scale, scale).sum(axis=(3, 5))


# =============================================================================
# On a GPU: one patch gather, one product per chunk
# =============================================================================
# The CPU path above is shaped by a core's cache: chunks of a few images, rows
# copied as long runs, zero fills afterwards. On a GPU each of those NumPy-
# style calls is a kernel launch, and a training step measured on an H100
# (batch 128, mnist preset) spent as long issuing kernels as running them:
# the host, not the GPU, set the pace. So on CuPy a convolution is a few
# launches whatever its shape:
# - forward: one kernel gathers the patches of a chunk of images (im2col,
#   written below in CUDA C++), one batched product per chunk writes straight
#   into the NCHW output (the weights the same for every image: batch stride
#   0, no copy), then the bias and `add` in one pass;
# - backward: dL/dy once transposed to (O, images, pixels), so that a chunk
#   of images is one matrix: dL/dw is ONE product of it with the chunk's
#   patches (gathered into (K, images, pixels); a row of ones under them
#   makes the product's last column dL/db), accumulated over chunks by
#   cuBLAS's beta = 1; dL/dx is the patch gradients (one product) put back
#   by the gather's adjoint (col2im: each input pixel sums the patch
#   gradients that read it, a gather again, so no atomic additions and a
#   fixed order). Measured on an H100 against per-image products summed
#   afterwards: 0.71-0.86x the time at 7x7 and 14x14, 1.00-1.06x at 28x28,
#   and no sum to launch.
# A 1x1 convolution needs no gather in the forward (the image is its own
# patch matrix) and none for dL/dx; for dL/dw its "gather" is the transpose.
# Every function here also runs on NumPy (the gather as a strided view), which
# is how the CPU-only tests check the layout arithmetic; tests/gpu compares the
# CUDA kernels with it.

_GPU_SOURCE = r"""
// Grid (pixel blocks, C, n): thread (p, c, b) reads the kh x kw window of output
// pixel p = (i, j) in channel c of image b once and writes it down rows (c, u, v):
//     cols[b * image_stride + ((c * kh + u) * kw + v) * row_stride + p]
//         = x[b, c, i * stride + u - pad, j * stride + v - pad]   (0 outside the image).
// 32-bit index arithmetic, one division per window. Measured on an H100 (batch 128,
// 64 channels, 28x28): 0.10 ms, against 0.38 ms for one thread per value with the
// flat index divided five times (and 0.16 ms for a plain copy of the patch matrix).
template <typename T>
__global__ void im2col(const T* x, T* cols, int C, int H, int W, int kh, int kw, int stride,
                       int pad, int Ho, int Wo, long long image_stride, long long row_stride) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= Ho * Wo) return;
    int c = blockIdx.y, b = blockIdx.z;
    int i = p / Wo, j = p - i * Wo;
    int h0 = i * stride - pad, w0 = j * stride - pad;
    const T* image = x + ((long long)b * C + c) * H * W;
    T* out = cols + b * image_stride + (long long)c * kh * kw * row_stride + p;
    for (int u = 0; u < kh; ++u) {
        int h = h0 + u;
        bool inside = h >= 0 && h < H;
        for (int v = 0; v < kw; ++v) {
            int w = w0 + v;
            out[(u * kw + v) * row_stride] = (inside && w >= 0 && w < W) ? image[h * W + w] : T(0);
        }
    }
}

// The adjoint. Grid (pixel blocks, C, n): x[b, c, h, w] = the sum, in the order of
// (u, v), of the cols entries that im2col filled from it; a gather, so no atomics.
template <typename T>
__global__ void col2im(const T* cols, T* x, int C, int H, int W, int kh, int kw, int stride,
                       int pad, int Ho, int Wo, long long image_stride, long long row_stride) {
    int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= H * W) return;
    int c = blockIdx.y, b = blockIdx.z;
    int h = q / W, w = q - h * W;
    const T* rows = cols + b * image_stride + (long long)c * kh * kw * row_stride;
    T sum = T(0);
    for (int u = 0; u < kh; ++u) {
        int hi = h + pad - u, i = hi / stride;             // output row i read it if hi = i * stride
        if (hi < 0 || i * stride != hi || i >= Ho) continue;
        for (int v = 0; v < kw; ++v) {
            int wj = w + pad - v, j = wj / stride;
            if (wj < 0 || j * stride != wj || j >= Wo) continue;
            sum += rows[(u * kw + v) * row_stride + i * Wo + j];
        }
    }
    x[((long long)b * C + c) * H * W + q] = sum;
}
"""

# Bytes of one chunk's patch matrix on a GPU: few, large products, and the
# memory for the patches of the whole batch bounded (at batch 128, the mnist
# UNet's largest is 690 MB).
_GPU_CHUNK_BYTES = 256 << 20


def _gpu_chunk(B, per_image_values, itemsize):
    """Images per chunk: within _GPU_CHUNK_BYTES, and at most 65535 (the kernels' grid)."""
    return max(1, min(B, 65535, _GPU_CHUNK_BYTES // max(1, per_image_values * itemsize)))


def _cols_strides(cols, dtype):
    """(image stride, row stride) in values of a patch matrix (n, K, P) whose
    rows are runs of memory, of the kernel's dtype. (An axis of length 1 may
    have any stride: CuPy's reshape gives it the next axis's.)"""
    if cols.dtype != dtype:
        raise TypeError(f"patch matrix of dtype {cols.dtype} for arrays of {dtype}")
    if cols.shape[2] > 1 and cols.strides[2] != cols.itemsize:
        raise ValueError(f"patch matrix rows must be runs of memory, got strides {cols.strides}")
    return cols.strides[0] // cols.itemsize, cols.strides[1] // cols.itemsize


def gather_patches(x, kh, kw, stride, padding, cols):
    """Fill cols (n, C*kh*kw, Ho*Wo) with the patches of x (n, C, H, W): row
    (c, u, v) of image b holds x_pad[b, c, s*i+u, s*j+v] at column (i, j)."""
    n, C, H, W = x.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if backend.is_cuda_array(x):
        x = backend.cupy.ascontiguousarray(x)
        kernel = backend.cuda_kernel(_GPU_SOURCE, "im2col", x.dtype)
        image_stride, row_stride = _cols_strides(cols, x.dtype)
        kernel(*_grid(Ho * Wo, C, n), (x, cols, *_i32(C, H, W, kh, kw, stride, padding, Ho, Wo),
                                                 *_i64(image_stride, row_stride)))
        return cols
    xp = get_array_module(x)
    x_pad = _pad(x, padding)
    sb, sc, sh, sw = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(x_pad, (n, C, kh, kw, Ho, Wo),
                                           (sb, sc, sh, sw, stride * sh, stride * sw))
    cols.reshape(n, C, kh, kw, Ho, Wo)[...] = view
    return cols


def scatter_patches(dcols, kh, kw, stride, padding, dx):
    """dx (n, C, H, W) = the adjoint of gather_patches applied to dcols (n, K,
    P): each input pixel gets the sum of the patch entries read from it."""
    n, C, H, W = dx.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if backend.is_cuda_array(dx):
        if not dx.flags.c_contiguous:
            raise ValueError("scatter_patches: dx must be C-contiguous")
        kernel = backend.cuda_kernel(_GPU_SOURCE, "col2im", dx.dtype)
        image_stride, row_stride = _cols_strides(dcols, dx.dtype)
        kernel(*_grid(H * W, C, n), (dcols, dx, *_i32(C, H, W, kh, kw, stride, padding, Ho, Wo),
                                     *_i64(image_stride, row_stride)))
        return dx
    xp = get_array_module(dx)
    d6 = dcols.reshape(n, C, kh, kw, Ho, Wo)
    dx_pad = xp.zeros((n, C, H + 2 * padding, W + 2 * padding), dtype=dx.dtype)
    for u in range(kh):
        for v in range(kw):
            dx_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride] += d6[:, :, u, v]
    dx[...] = dx_pad[:, :, padding:padding + H, padding:padding + W]
    return dx


def _grid(pixels, rows, images):
    """(grid, block) of the two kernels: pixels across threads, one block row per (row, image)."""
    if rows > 65535 or images > 65535 or pixels >= 1 << 31:
        raise ValueError(f"convolution too large for the GPU kernels' grid: {rows} rows of "
                         f"{pixels} pixels, {images} images a chunk")
    block = min(256, -(-pixels // 32) * 32)
    return (-(-pixels // block), rows, images), (block,)


def _i32(*values):
    import numpy as np
    return tuple(np.int32(v) for v in values)


def _i64(*values):
    import numpy as np
    return tuple(np.int64(v) for v in values)


@backend.elementwise
def _add_two(xp):
    """y += b + a in place (a convolution's bias and its `add`, one pass)."""
    def add_two(y, b, a):
        y += b + a
    return add_two


def conv2d_forward_gpu(x, w, stride=1, padding=0, bias=None, add=None):
    """conv2d_forward as the GPU runs it (any backend; see the section's comment)."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    P, K = Ho * Wo, C * kh * kw
    x = xp.ascontiguousarray(x)
    w2 = xp.ascontiguousarray(w).reshape(O, K)
    y = xp.empty((B, O, Ho, Wo), dtype=x.dtype)
    y3 = y.reshape(B, O, P)
    if kh == kw == 1 and stride == 1 and padding == 0:
        backend.gemm(w2, x.reshape(B, C, P), y3)                        # y[b] = w x[b]
    else:
        nb = _gpu_chunk(B, K * P, x.itemsize)
        cols = xp.empty((nb, K, P), dtype=x.dtype)
        for b0 in range(0, B, nb):
            n = min(nb, B - b0)
            gather_patches(x[b0:b0 + n], kh, kw, stride, padding, cols[:n])
            backend.gemm(w2, cols[:n], y3[b0:b0 + n])                   # y[b] = w cols[b]
    b4 = None if bias is None else bias.reshape(1, O, 1, 1)
    if b4 is not None and add is not None:
        _add_two(y, b4, add)
    elif b4 is not None:
        y += b4
    elif add is not None:
        y += add
    return y


def conv2d_backward_gpu(grad, x, w, stride=1, padding=0, need_x=True, need_w=True, need_b=False):
    """conv2d_backward as the GPU runs it (any backend; see the section's comment)."""
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = grad.shape[2:]
    P, K = Ho * Wo, C * kh * kw
    w2 = xp.ascontiguousarray(w).reshape(O, K)
    x = xp.ascontiguousarray(x)
    dx = xp.empty(x.shape, dtype=grad.dtype) if need_x else None
    one_by_one = kh == kw == 1 and stride == 1 and padding == 0
    if need_x and one_by_one:                                           # dx[b] = w^T dL/dy[b]
        backend.gemm(w2.T, xp.ascontiguousarray(grad).reshape(B, O, P), dx.reshape(B, C, P))
    patches_x = need_x and not one_by_one
    if not (need_w or patches_x) or B == 0:                             # no product over patches
        db = grad.sum(axis=(0, 2, 3)) if need_b else None
        return dx, (xp.zeros(w.shape, dtype=grad.dtype) if need_w else None), db
    # dL/dy as (O, images, pixels): a chunk of n images is then one matrix (O, n*P)
    g_t = xp.empty((O, B, P), dtype=grad.dtype)
    g_t[...] = grad.reshape(B, O, P).transpose(1, 0, 2)
    weights = need_w
    ones = int(need_b)                  # a row of ones under the patches: its column of dL/dw is dL/db
    nb = _gpu_chunk(B, (K + ones) * P * weights + K * P * patches_x, x.itemsize)
    if weights:
        cols = xp.empty((K + ones, nb * P), dtype=x.dtype)
        if need_b:
            cols[K] = 1
        dwb = xp.empty((O, K + ones), dtype=grad.dtype)
    if patches_x:
        dcols = xp.empty((K, nb * P), dtype=grad.dtype)
    for b0 in range(0, B, nb):
        n = min(nb, B - b0)
        g = g_t[:, b0:b0 + n].reshape(O, n * P)                         # a view, rows B*P apart
        if weights:                                                     # [dL/dw dL/db] = g [cols; 1]^T
            c = cols[:, :n * P]
            gather_patches(x[b0:b0 + n], kh, kw, stride, padding, c[:K].reshape(K, n, P).transpose(1, 0, 2))
            backend.gemm(g, c.T, dwb, accumulate=b0 > 0)
        if patches_x:                                                   # patch gradients, put back
            d = dcols[:, :n * P]
            backend.gemm(w2.T, g, d)
            scatter_patches(d.reshape(K, n, P).transpose(1, 0, 2), kh, kw, stride, padding, dx[b0:b0 + n])
    dw = xp.ascontiguousarray(dwb[:, :K]).reshape(w.shape) if need_w else None
    if need_b:
        db = xp.ascontiguousarray(dwb[:, K]) if weights else g_t.reshape(O, B * P).sum(axis=1)
    else:
        db = None
    return dx, dw, db
