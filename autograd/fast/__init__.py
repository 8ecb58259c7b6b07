"""The fast layer: faster twins of the plain kernels, installed through autograd/seam.py.

Everything the engine does to be fast, and nothing it needs to be correct,
lives here; the plain engine around it runs and passes its tests without it.

    AUTOGRAD_FAST=0|1                    the switch, read by `import autograd` (on by default)
    autograd.fast.enable() / disable()   the same from Python; enabled() says which is in use
    AUTOGRAD_PROCESSES=N                 how many processes share a batch (processes.py; 1: no split)
    AUTOGRAD_MALLOC=default              leave glibc's malloc settings alone (memory.py)

The CPU kernels' first call holds NumPy's BLAS at one thread and asks glibc's
malloc to keep freed memory, for the whole process (threads.py, memory.py
say why); disable() gives the BLAS its threads back.

What the twins do, by file:
- conv_cpu.py, norm_cpu.py: the CPU kernels a few images at a time (each
  chunk's buffers stay in cache), run on threads (threads.py), with the
  group norm and its SiLU in fewer passes over memory; memory.py: the
  allocator and NumPy buffer settings they rely on.
- attention.py: attention in chunks on the threads (CPU), and in products
  that read transposed operands in place (GPU).
- conv_gpu.py, norm_gpu.py, cuda.py: on a GPU, few and large launches: a
  patch-gather kernel and direct cuBLAS products per convolution, one CUDA
  kernel forward and two backward for the group norm, fused element-wise
  chains, and the TF32 switch.
- optim.py: Adam, the EMA and the clipping on one flat buffer (GPU).
- processes.py: `nn.batch_parallel`, which splits each batch over forked
  processes on a CPU with several cores.

Every twin has the signature of its plain kernel and is tested equal to it
(tests/test_fast.py); the twins choose the CPU or the GPU version from the
arrays they are given.
"""
import os

from .. import seam
from ..backend import is_cuda_array
from ..tensor import is_grad_enabled
from . import attention, conv_cpu, conv_gpu, norm_cpu, norm_gpu, optim, processes, threads
from .cuda import set_tf32  # noqa: F401  (autograd.fast.set_tf32(True): TF32 products on a GPU)


# =============================================================================
# The twins, by the names of the plain kernels they replace
# =============================================================================

def conv2d_forward(x, w, b, stride, padding):
    if is_cuda_array(x):
        return conv_gpu.conv2d_forward_gpu(x, w, b, stride, padding)
    return conv_cpu.conv2d_forward(x, w, b, stride, padding)


def conv2d_backward(grad, x, w, stride, padding, need_x=True, need_w=True, need_b=True):
    run = conv_gpu.conv2d_backward_gpu if is_cuda_array(x) else conv_cpu.conv2d_backward
    return run(grad, x, w, stride, padding, need_x, need_w, need_b)


def upsample_nearest2d_forward(x, scale):
    if is_cuda_array(x):   # the CPU twin's scale^2 strided copies would be scale^2 launches; plain: one
        return seam.plain_kernels()["upsample_nearest2d_forward"](x, scale)
    return conv_cpu.upsample_nearest2d_forward(x, scale)


def upsample_nearest2d_backward(grad, scale):
    if is_cuda_array(grad):
        return seam.plain_kernels()["upsample_nearest2d_backward"](grad, scale)
    return conv_cpu.upsample_nearest2d_backward(grad, scale)


def _group_norm(x, num_groups, weight, bias, eps, silu):
    """(y, saved) of the group norm (+ SiLU) twins: saved is (x, mean, rstd, y, u, weight, G)."""
    keep_u = is_grad_enabled()                   # u serves only the backward; sampling skips it
    if is_cuda_array(x):
        B, C = x.shape[:2]
        y, mean, rstd, u = norm_gpu.forward_cuda(x.reshape(B, C, -1), num_groups, weight, bias,
                                                 eps, silu, keep_u)
        y = y.reshape(x.shape)
        u = None if u is None else u.reshape(x.shape)
    else:
        y, mean, rstd, u = norm_cpu.group_norm_fused_forward(x, num_groups, weight, bias, eps,
                                                             silu=silu, keep_u=keep_u)
    return y, (x, mean, rstd, y if silu else None, u, weight, num_groups)


def _group_norm_grad(grad, saved):
    x, mean, rstd, y, u, weight, num_groups = saved
    if is_cuda_array(x):
        B, C = x.shape[:2]
        flat = (lambda a: None if a is None else a.reshape(B, C, -1))
        dx, dweight, dbias = norm_gpu.backward_cuda(flat(grad), flat(x), mean, rstd, weight,
                                                    flat(y), flat(u))
        return dx.reshape(x.shape), dweight, dbias
    return norm_cpu.group_norm_fused_backward(grad, x, mean, rstd, num_groups, weight, y, u)


def group_norm_forward(x, num_groups, weight, bias, eps):
    return _group_norm(x, num_groups, weight, bias, eps, silu=False)


def group_norm_silu_forward(x, num_groups, weight, bias, eps):
    return _group_norm(x, num_groups, weight, bias, eps, silu=True)


TWINS = {
    "conv2d_forward": conv2d_forward,
    "conv2d_backward": conv2d_backward,
    "upsample_nearest2d_forward": upsample_nearest2d_forward,
    "upsample_nearest2d_backward": upsample_nearest2d_backward,
    "group_norm_forward": group_norm_forward,
    "group_norm_backward": _group_norm_grad,
    "group_norm_silu_forward": group_norm_silu_forward,
    "group_norm_silu_backward": _group_norm_grad,
    "attention_forward": attention.attention_forward,
    "attention_backward": attention.attention_backward,
    "adam_update": optim.adam_update,
    "ema_update": optim.ema_update,
    "clip_grad_norm": optim.clip_grad_norm,
    "batch_parallel": processes.batch_parallel,
}


# =============================================================================
# The switch
# =============================================================================

def enable():
    """Run the twins in place of the plain kernels (the default)."""
    seam.install(TWINS)


def disable():
    """Run the plain kernels only. The BLAS gets back the threads the fast CPU
    kernels held it to (threads.py); glibc's malloc setting (memory.py) stays."""
    seam.uninstall()
    threads.release_blas()


def enabled():
    """True while the twins are installed."""
    return bool(seam.installed())


def enabled_by_environment():
    """What AUTOGRAD_FAST asks for: on unless it is "0"; anything but "0" or "1" is refused."""
    value = os.environ.get("AUTOGRAD_FAST", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"AUTOGRAD_FAST must be 0 or 1, got {value!r}")
    return value == "1"
