"""Convolution and nearest upsampling on raw arrays (NumPy or CuPy through `xp`).

Layout is NCHW, weights (C_out, C_in, kH, kW), as PyTorch. CuPy 14 has no
cuDNN module, so both backends do the same thing: gather every kH x kW patch
into a row (im2col) and multiply by the weight matrix.

With y = conv(x, w):   y[b, o, i, j] = sum_{c, u, v} w[o, c, u, v] x_pad[b, c, s*i+u, s*j+v]
- dL/dw is the same patches times dL/dy (one matrix product), and
- dL/dx sends each dL/dy value back to the pixels of its patch: for every
  kernel offset (u, v), one strided add into the padded gradient, so no
  scatter with repeated indices (`add.at`) is needed.

`conv2d_reference` (direct loops over the kernel) is the readable version and
the tests' oracle.
"""
from ..backend import get_array_module


def _pad(x, padding):
    if padding == 0:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def output_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _patches(x_pad, kh, kw, stride, Ho, Wo):
    """im2col: a (B*Ho*Wo, C*kh*kw) matrix, one row per output pixel."""
    xp = get_array_module(x_pad)
    B, C = x_pad.shape[:2]
    windows = xp.lib.stride_tricks.sliding_window_view(x_pad, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride][:, :, :Ho, :Wo]    # (B, C, Ho, Wo, kh, kw)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(B * Ho * Wo, C * kh * kw)


def conv2d_forward(x, w, stride=1, padding=0):
    """x (B, C, H, W), w (O, C, kh, kw) -> y (B, O, Ho, Wo)."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if kh == kw == 1 and stride == 1 and padding == 0:
        # A 1x1 convolution is a matrix product over the channel axis.
        return xp.matmul(w.reshape(O, C), x.reshape(B, C, H * W)).reshape(B, O, H, W)
    cols = _patches(_pad(x, padding), kh, kw, stride, Ho, Wo)          # (B*Ho*Wo, C*kh*kw)
    y = cols @ w.reshape(O, C * kh * kw).T                              # (B*Ho*Wo, O)
    return xp.ascontiguousarray(y.reshape(B, Ho, Wo, O).transpose(0, 3, 1, 2))


def conv2d_backward(grad, x, w, stride=1, padding=0, need_x=True, need_w=True):
    """Gradients (dx, dw) of conv2d_forward for dL/dy = grad (B, O, Ho, Wo)."""
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = grad.shape[2:]
    dx = dw = None
    if kh == kw == 1 and stride == 1 and padding == 0:
        g = grad.reshape(B, O, H * W)
        if need_w:
            dw = xp.matmul(g, x.reshape(B, C, H * W).transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
        if need_x:
            dx = xp.matmul(w.reshape(O, C).T, g).reshape(x.shape)
        return dx, dw

    g = grad.transpose(0, 2, 3, 1).reshape(B * Ho * Wo, O)             # one row per output pixel
    if need_w:
        cols = _patches(_pad(x, padding), kh, kw, stride, Ho, Wo)
        dw = (g.T @ cols).reshape(w.shape)
    if need_x:
        dcols = (g @ w.reshape(O, C * kh * kw)).reshape(B, Ho, Wo, C, kh, kw)
        dx_pad = xp.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=grad.dtype)
        for u in range(kh):
            for v in range(kw):
                # Every output pixel (i, j) read input pixel (s*i+u, s*j+v) with weight offset (u, v).
                dx_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride] += \
                    dcols[:, :, :, :, u, v].transpose(0, 3, 1, 2)
        dx = dx_pad[:, :, padding:padding + H, padding:padding + W]
        dx = xp.ascontiguousarray(dx)
    return dx, dw


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
    """Each pixel becomes a scale x scale block: (B, C, H, W) -> (B, C, sH, sW)."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    y = xp.broadcast_to(x[:, :, :, None, :, None], (B, C, H, scale, W, scale))
    return y.reshape(B, C, H * scale, W * scale)


def upsample_nearest2d_backward(grad, scale):
    """Each input pixel was copied to a block, so its gradient is the block's sum."""
    B, C, Hs, Ws = grad.shape
    return grad.reshape(B, C, Hs // scale, scale, Ws // scale, scale).sum(axis=(3, 5))
