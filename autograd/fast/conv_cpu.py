"""Convolution and nearest upsampling on a CPU: the plain kernels' faster twins.

Twins of autograd/kernels/conv.py, shaped by a CPU core's cache and by the
cost of each NumPy call; tests/test_fast.py holds each equal to its plain
version. The plain convolution gathers the patches of the whole batch and
multiplies once; here:

- Images go through in chunks, a few at a time, so that each chunk's patch
  matrix stays in cache while the product reads it, and the chunks run on the
  fast layer's threads (threads.py).
- The patch matrix is (C*kh*kw, images*pixels): one row per (channel, offset),
  images side by side, so a chunk needs one large product and its rows are
  long contiguous copies instead of kW-value pieces.
- For stride 1 each row is one run of memory: reading the image as a flat
  array of rows, the pixels (i, j) and (i, j + 1) of a patch row are
  neighbours. Where the output is no wider than the input (every stride-1
  convolution of the UNet, with "same" padding) the rows are not padded at
  the sides at all: the patch values whose read wrapped round into the row
  above or below are set to zero after the gather, one strided fill per
  such kernel column. Where the output is wider than the input the rows are
  padded on the left to a width R: a patch over the right edge of row i
  reads the left padding of row i + 1, zero too, and the extra columns are
  dropped.
- The bias rides inside the product: one more weight column against a patch
  row of ones, so it costs no pass of its own over the output.
- dL/dx for stride 1 is itself a convolution: of dL/dy, padded by k-1-p, with
  the weights flipped in space and C_in/C_out swapped. When the backward
  needs both dL/dx and dL/dw, both come from the one patch matrix of dL/dy
  (`_conv2d_backward_shared_patches`), so no second one, of x, is gathered.
- Where C_in is well above C_out, a forward skips im2col altogether
  (`_conv2d_forward_output_side`).
"""
from ..backend import get_array_module
from ..kernels.conv import output_size
from .threads import Scratch, parallel_for

# Bytes of patch matrix per chunk of images (at least one image): about 1 MB
# stays in a core's L2 cache while the matrix product reads it.
_CHUNK_BYTES = 1 << 20
# Runs of chunks in dL/dw's backward, each with its own partial sum (see there):
# enough for a few threads to share, few enough that the partial sums stay small.
_SUMS = 8


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


def _chunk(B, rows_per_image, itemsize):
    per_image = rows_per_image * itemsize
    return max(1, min(B, _CHUNK_BYTES // max(1, per_image)))


def _in_runs(n_chunks, chunk):
    """chunk(i, worker, r) for every chunk i, in n_runs = min(n_chunks, _SUMS) runs
    of consecutive chunks, run r on one thread: each run adds its dL/dw and dL/db
    terms into its own partial sum (index r), and the caller adds those in run
    order after the loop, so that the sums depend neither on the number of
    threads nor on which finished first (the caller sizes them with _n_runs)."""
    n_runs = _n_runs(n_chunks)

    def run(r, worker):
        for i in range(r * n_chunks // n_runs, (r + 1) * n_chunks // n_runs):
            chunk(i, worker, r)

    parallel_for(n_runs, run)


def _n_runs(n_chunks):
    return min(n_chunks, _SUMS)


def conv2d_forward(x, w, bias=None, stride=1, padding=0):
    """x (B, C, H, W), w (O, C, kh, kw), bias (O,) or None -> y (B, O, Ho, Wo)."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    b_col = None if bias is None else bias.reshape(O, 1, 1, 1)
    if kh == kw == 1 and stride == 1 and padding == 0:
        return _conv1x1_forward(x, w, b_col)
    if stride == 1 and _output_side(x, O, Ho * Wo):
        return _conv2d_forward_output_side(x, w, padding, b_col)
    K = C * kh * kw
    w2 = w.reshape(O, K)
    if bias is not None:
        # The bias as one more weight column, against a patch row of ones: added
        # inside the product, no pass of its own over the output.
        w2 = xp.concatenate([w2, bias.reshape(O, 1).astype(w2.dtype, copy=False)], axis=1)
    y = xp.empty((B, O, Ho, Wo), dtype=x.dtype)
    row = _row(W, kw, stride, padding, Wo)
    nb = _chunk(B, K * Ho * row, x.itemsize)
    im2col, _ = _im2col(x, kh, kw, stride, padding, Ho, Wo, nb, ones=bias is not None)

    def chunk(i, worker):
        b0 = i * nb
        n = min(nb, B - b0)
        cols = im2col(b0, n, worker)
        if n == 1 and row == Wo:                # one image, no columns to drop: straight into y
            xp.matmul(w2, cols, out=y[b0].reshape(O, Ho * Wo))
            return
        yc = xp.matmul(w2, cols).reshape(O, n, Ho, row)
        y[b0:b0 + n] = yc[:, :, :, :Wo].transpose(1, 0, 2, 3)

    parallel_for(-(-B // nb), chunk)
    return y


def _output_side(x, O, out_pixels):
    """Whether a stride-1 convolution of x to O channels runs output-side (see there)."""
    return x.shape[1] >= 2 * O and out_pixels >= 28 * 28


def _conv1x1_forward(x, w, b_col=None):
    """A 1x1 convolution is a matrix product over the channel axis, image by image."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O = w.shape[0]
    w2, x3 = w.reshape(O, C), x.reshape(B, C, H * W)
    y = xp.empty((B, O, H * W), dtype=x.dtype)
    nb = _chunk(B, (C + O) * H * W, x.itemsize)

    def chunk(i, worker):
        yc = xp.matmul(w2, x3[i * nb:(i + 1) * nb], out=y[i * nb:(i + 1) * nb])
        if b_col is not None:
            yc += b_col.reshape(O, 1)

    parallel_for(-(-B // nb), chunk)
    return y.reshape(B, O, H, W)


def _conv1x1_backward(grad, x, w, need_x, need_w, need_b):
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O = w.shape[0]
    g3, x3, w2 = grad.reshape(B, O, H * W), x.reshape(B, C, H * W), w.reshape(O, C)
    nb = _chunk(B, (C + O) * H * W, x.itemsize)
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

    _in_runs(n_chunks, chunk)
    return (dx.reshape(x.shape) if need_x else None,
            dw_parts.sum(axis=0).reshape(w.shape) if need_w else None,
            db_parts.sum(axis=0) if need_b else None)


def _conv2d_forward_output_side(x, w, padding, b_col=None):
    """Stride 1 without im2col: all kh*kw weight slices times the padded input
    in one product, then the kh*kw shifted outputs added up.

    y[o, i, j] = sum_{u, v} (w[:, :, u, v] @ x_pad)[o, i + u, j + v]. The copy
    this makes is kh*kw times the output instead of kh*kw times the input, so
    it pays where C_in is well above C_out on large maps (the UNet's up path at
    28x28 and its last 32->1), and not at C_in = C_out or on small maps, where
    the product's extra columns over the padding cost more than the copy
    saves: hence the dispatch in conv2d_forward (_output_side). It keeps rows
    padded on the left (_padded_row), so that the shifted additions read
    zeros past an edge.
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
    nb = _chunk(B, kh * kw * O * L, x.itemsize)
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
        y[b0:b0 + n] = acc[:, :, :, :Wo].transpose(1, 0, 2, 3)

    parallel_for(-(-B // nb), chunk)
    return y


def conv2d_backward(grad, x, w, stride=1, padding=0, need_x=True, need_w=True, need_b=True):
    """Gradients (dx, dw, db) of conv2d_forward for dL/dy = grad (B, O, Ho, Wo).

    Each is None unless asked for (need_x, need_w, need_b).
    """
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
        dx = conv2d_forward(grad, w_flip, None, 1, kh - 1 - padding)
    if not (need_w or need_b or (need_x and dx is None)):
        return dx, dw, db

    K = C * kh * kw
    Hp, Wp = H + 2 * padding, W + 2 * padding
    row = _row(W, kw, stride, padding, Wo)
    nb = _chunk(B, K * Ho * row, x.itemsize)
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
    # dL/db as ones @ dL/dy: a column sum by the BLAS, far faster than sum(axis=0) here.
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

    _in_runs(n_chunks, chunk)
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
    nb = _chunk(B, K * H * row, x.itemsize)
    n_chunks = -(-B // nb)
    im2col, _ = _im2col(grad, k, k, 1, q, H, W, nb)
    # x channels last (one row per column of P: OpenBLAS runs the product P @ x
    # faster than x @ P^T); the extra columns stay zero.
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

    _in_runs(n_chunks, chunk)
    dw = dw_parts.sum(axis=0).reshape(O, k, k, C)[:, ::-1, ::-1].transpose(0, 3, 1, 2)
    db = None
    if need_b:
        db = db_parts.sum(axis=0) if db_from_centre else grad.sum(axis=(0, 2, 3))
    return dx, xp.ascontiguousarray(dw), db


def upsample_nearest2d_forward(x, scale):
    """Each pixel becomes a scale x scale block: (B, C, H, W) -> (B, C, sH, sW).

    Written as scale^2 strided copies of x, a few images at a time: faster on
    a CPU than reshaping a broadcast view, whose copy walks six axes, two of
    them of length scale.
    """
    xp = get_array_module(x)
    B, C, H, W = x.shape
    y = xp.empty((B, C, H * scale, W * scale), dtype=x.dtype)
    nb = _chunk(B, C * H * W * scale * scale, x.itemsize)

    def chunk(k, worker):
        for i in range(scale):
            for j in range(scale):
                y[k * nb:(k + 1) * nb, :, i::scale, j::scale] = x[k * nb:(k + 1) * nb]

    parallel_for(-(-B // nb), chunk)
    return y


def upsample_nearest2d_backward(grad, scale):
    """Each input pixel was copied to a block, so its gradient is the block's sum.

    Summed as scale^2 strided views of dL/dy added into dL/dx, a few images at a
    time on the thread pool as the forward: a reduction over the two short
    block axes (`.sum(axis=(3, 5))`) is several times slower on a CPU.
    """
    xp = get_array_module(grad)
    B, C, Hs, Ws = grad.shape
    g = xp.empty((B, C, Hs // scale, Ws // scale), dtype=grad.dtype)
    nb = _chunk(B, C * Hs * Ws, grad.itemsize)

    def chunk(k, worker):
        b = slice(k * nb, (k + 1) * nb)
        views = [grad[b, :, i::scale, j::scale] for i in range(scale) for j in range(scale)]
        if len(views) == 1:                                             # scale 1: a copy
            g[b] = views[0]
            return
        gc = xp.add(views[0], views[1], out=g[b])
        for v in views[2:]:
            gc += v

    parallel_for(-(-B // nb), chunk)
    return g
