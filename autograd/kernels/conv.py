"""Convolution and nearest upsampling on raw arrays (NumPy or CuPy, through `xp`).

Layout NCHW, weights (C_out, C_in, kH, kW), as PyTorch. A convolution is one
matrix product once every kH x kW patch of the zero-padded input is laid out
as a column (im2col):

    y[b, o, i, j] = sum_{c, u, v} w[o, c, u, v] x_pad[b, c, s i + u, s j + v]
    y[b] = W2 @ cols[b],   W2 = w reshaped (C_out, C_in kH kW),  cols[b] (C_in kH kW, Ho Wo)

Backward, with G[b] = dL/dy[b] reshaped (C_out, Ho Wo), is two more products:

    dL/dW2   = sum over images of G[b] @ cols[b]^T
    dL/dcols = W2^T @ G[b],  and dL/dx = col2im(dL/dcols)
    dL/db    = G summed over images and pixels

where col2im, the adjoint of im2col, adds each patch entry's gradient back
onto the input pixel it was read from (a pixel appears in up to kH kW patches).
"""
from ..backend import get_array_module
from ..seam import swappable


def output_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def im2col(x, kh, kw, stride, padding):
    """x (B, C, H, W) -> cols (B, C kh kw, Ho Wo): column (i, j) of image b is the
    patch under output pixel (i, j), rows in the order (c, u, v) of w's axes."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = xp.empty((B, C, kh, kw, Ho, Wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            # Offset (u, v) of every patch: a strided slice of the padded image.
            cols[:, :, u, v] = x_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride]
    return cols.reshape(B, C * kh * kw, Ho * Wo)


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """The adjoint of im2col: dcols (B, C kh kw, Ho Wo) -> dx of shape x_shape, each
    input pixel the sum of the entries of dcols that im2col copied from it."""
    xp = get_array_module(dcols)
    B, C, H, W = x_shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    d = dcols.reshape(B, C, kh, kw, Ho, Wo)
    dx_pad = xp.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=dcols.dtype)
    for u in range(kh):
        for v in range(kw):
            dx_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride] += d[:, :, u, v]
    return dx_pad[:, :, padding:padding + H, padding:padding + W]


@swappable
def conv2d_forward(x, w, b, stride, padding):
    """x (B, C, H, W), w (O, C, kh, kw), b (O,) or None -> y (B, O, Ho, Wo)."""
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    cols = im2col(x, kh, kw, stride, padding)                       # (B, C kh kw, Ho Wo)
    y = w.reshape(O, -1) @ cols                                     # (B, O, Ho Wo)
    if b is not None:
        y += b.reshape(1, O, 1)
    return y.reshape(B, O, Ho, Wo)


@swappable
def conv2d_backward(grad, x, w, stride, padding, need_x=True, need_w=True, need_b=True):
    """(dL/dx, dL/dw, dL/db) for dL/dy = grad (B, O, Ho, Wo); each None unless asked for."""
    xp = get_array_module(grad, x, w)
    B, O, Ho, Wo = grad.shape
    kh, kw = w.shape[2:]
    g = grad.reshape(B, O, Ho * Wo)                                 # G[b]
    dx = dw = db = None
    if need_w:
        cols = im2col(x, kh, kw, stride, padding)
        # sum_b G[b] @ cols[b]^T: one product over the (image, pixel) axes
        dw = xp.tensordot(g, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
    if need_x:
        dcols = w.reshape(O, -1).T @ g                              # (B, C kh kw, Ho Wo)
        dx = col2im(dcols, x.shape, kh, kw, stride, padding)
    if need_b:
        db = g.sum(axis=(0, 2))
    return dx, dw, db


@swappable
def upsample_nearest2d_forward(x, scale):
    """Each pixel becomes a scale x scale block: (B, C, H, W) -> (B, C, sH, sW)."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    blocks = xp.broadcast_to(x[:, :, :, None, :, None], (B, C, H, scale, W, scale))
    return blocks.reshape(B, C, H * scale, W * scale)


@swappable
def upsample_nearest2d_backward(grad, scale):
    """Each input pixel was copied into a block, so its gradient is the block's sum."""
    B, C, Hs, Ws = grad.shape
    return grad.reshape(B, C, Hs // scale, scale, Ws // scale, scale).sum(axis=(3, 5))
