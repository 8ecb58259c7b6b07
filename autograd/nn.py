"""Layers: Module, Parameter and the building blocks of the DDPM UNet.

A Module finds its parameters by walking its own attributes in the order they
were assigned, so `named_parameters()` lists them in definition order with
dotted names ("down.0.conv1.weight"), as PyTorch does. Shapes and
initialization follow PyTorch's defaults so that weights carry over.
"""
import contextlib
import math

import numpy as np

from . import backend
from . import functional as F
from .seam import swappable
from .tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates."""

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)


# =============================================================================
# Module
# =============================================================================

class Module:
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) pairs in the order the attributes were assigned."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter to 'cpu' or 'cuda' in place; returns self."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            p.grad = None if p.grad is None else backend.to_device(p.grad, device)
        return self

    def state_dict(self):
        """{name: array} in definition order; the arrays are the live data, not copies."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters (keeping their device and dtype).

        Refuses, naming the keys, any missing, unexpected or mis-shaped entry,
        before changing anything: a half-loaded model would be silently wrong.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        misshaped = [f"{k}: expected {tuple(p.shape)}, got {tuple(state[k].shape)}"
                     for k, p in params.items() if k in state and tuple(state[k].shape) != tuple(p.shape)]
        problems = []
        if missing:
            problems.append("missing keys " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys " + ", ".join(unexpected))
        if misshaped:
            problems.append("shape mismatch for " + "; ".join(misshaped))
        if problems:
            raise ValueError("load_state_dict: " + " | ".join(problems))
        for name, p in params.items():
            value = state[name]
            if backend.is_cuda_array(value) != (p.device == "cuda"):
                value = backend.to_device(value, p.device)
            p.data[...] = p.xp.asarray(value, dtype=p.dtype)


class ModuleList(Module):
    """An ordered list of modules whose parameters are named "0.", "1.", ..."""

    def __init__(self, modules=()):
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self)), module)

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def __iter__(self):
        return (m for _, m in self.named_children())

    def __getitem__(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"ModuleList index {i} out of range for length {n}")
        return getattr(self, str(i % n))


# =============================================================================
# Layers
# =============================================================================

def _uniform(rng, bound, shape, dtype):
    return (rng.random(shape) * 2 - 1).astype(dtype) * dtype.type(bound)


def _init_rng(rng):
    # Weights are drawn on the host, so a seed gives the same model on any device.
    return rng if rng is not None else backend.global_rng("cpu")


class Linear(Module):
    """y = x W^T + b. Init as PyTorch: U(-1/sqrt(in), 1/sqrt(in)) for W and b
    (its Kaiming-uniform with a = sqrt(5) reduces to this bound)."""

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32):
        rng, dtype = _init_rng(rng), np.dtype(dtype)
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_features,), dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(Module):
    """2-D convolution, weight (C_out, C_in, k, k); init as PyTorch, fan_in = C_in k k."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=np.float32):
        rng, dtype = _init_rng(rng), np.dtype(dtype)
        self.stride, self.padding = stride, padding
        bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = Parameter(_uniform(rng, bound, (out_channels, in_channels, kernel_size, kernel_size), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_channels,), dtype)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class GroupNorm(Module):
    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32):
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels cannot be split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(np.ones(num_channels, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_channels, dtype)) if affine else None

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormSiLU(GroupNorm):
    """GroupNorm followed by SiLU, as one layer (one op: F.group_norm_silu).

    The DDPM UNet never normalizes without the SiLU right after, so the pair
    is one layer: the same parameters as GroupNorm (weight, bias), and one op
    whose kernels may work in fewer passes over memory than two would.
    """

    def forward(self, x):
        return F.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p=0.5):
        self.p = p

    def forward(self, x, rng=None):
        return F.dropout(x, self.p, self.training, rng)


class Embedding(Module):
    """A learned vector per id: ids (B,) of ints in [0, num_embeddings) -> weight[ids] (B, dim).

    The lookup is indexing, so its backward adds each row's gradient into the
    row it was read from (tensor.py's GetItem, with add.at for repeated ids).
    Initialized N(0, 1), as PyTorch's.
    """

    def __init__(self, num_embeddings, dim, rng=None, dtype=np.float32):
        rng, dtype = _init_rng(rng), np.dtype(dtype)
        self.num_embeddings = num_embeddings
        self.weight = Parameter(rng.standard_normal((num_embeddings, dim)).astype(dtype))

    def forward(self, ids):
        ids = ids.data if isinstance(ids, Tensor) else ids
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"Embedding: expected an integer array of shape (B,), got {ids.dtype} {ids.shape}")
        # Checked on the host only: on a GPU the check would wait for the device at every
        # call, and the labels that reach it there come from the library's own code.
        if isinstance(ids, np.ndarray) and ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise ValueError(f"Embedding: ids must lie in [0, {self.num_embeddings}), "
                             f"got {int(ids.min())}..{int(ids.max())}")
        return self.weight[ids]


class SinusoidalEmbedding(Module):
    """Timestep t -> [sin(t f_0..f_{h-1}), cos(t f_0..f_{h-1})], h = dim / 2,
    with f_i = exp(-ln(10000) i / (h - 1)) (Vaswani et al. 2017, as in DDPM's code).

    Computed in float64 and cast at the end: t f_0 reaches ~1000 radians, where
    float32 arguments would already lose the low digits.
    """

    def __init__(self, dim, dtype=np.float32):
        if dim % 2 or dim < 4:
            raise ValueError(f"SinusoidalEmbedding: dim must be even and >= 4, got {dim}")
        self.dim, self.dtype = dim, np.dtype(dtype)

    def forward(self, t):
        t = t.data if isinstance(t, Tensor) else t
        xp = backend.get_array_module(t)
        half = self.dim // 2
        freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=xp.float64) / (half - 1))
        args = xp.asarray(t, dtype=xp.float64)[:, None] * freqs[None, :]      # (B, half)
        return Tensor(xp.concatenate([xp.sin(args), xp.cos(args)], axis=1).astype(self.dtype))


class SelfAttention2d(Module):
    """Single-head self-attention over the H*W positions of a feature map.

    q, k, v and the output projection are 1x1 convolutions; every position
    attends to every other with weights softmax(q.k / sqrt(C)).
    """

    def __init__(self, channels, rng=None, dtype=np.float32):
        self.q = Conv2d(channels, channels, 1, rng=rng, dtype=dtype)
        self.k = Conv2d(channels, channels, 1, rng=rng, dtype=dtype)
        self.v = Conv2d(channels, channels, 1, rng=rng, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, rng=rng, dtype=dtype)

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, C, H * W).transpose(0, 2, 1)      # (B, HW, C)
        k = self.k(x).reshape(B, C, H * W).transpose(0, 2, 1)      # (B, HW, C)
        v = self.v(x).reshape(B, C, H * W).transpose(0, 2, 1)      # (B, HW, C)
        h = F.attention(q, k, v).transpose(0, 2, 1).reshape(B, C, H, W)
        return self.proj_out(h)


# =============================================================================
# Running a model over a batch
# =============================================================================

class BatchParallelError(RuntimeError):
    """A call of what batch_parallel gave could not compute its whole batch (a worker process
    failed or died), or the environment asks for a split that cannot be (the message says)."""


@swappable
def batch_parallel(model):
    """A context manager giving something to call in place of `model` on a batch.

    Here it is the model itself. autograd/fast swaps in a version that, on a
    CPU with several cores, splits each batch over forked processes (its
    result and gradients are the whole batch's, to float32 rounding), so a
    training loop or a sampler written as

        with nn.batch_parallel(model) as net:
            loss = diffusion.loss(net, x0, rng)

    reads the same with or without it. What it gives has `processes`, how
    many processes share a call (the model itself: none, read as 1). A call
    that cannot be completed raises BatchParallelError.
    """
    return contextlib.nullcontext(model)

