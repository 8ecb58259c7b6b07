"""Element-wise activations on raw arrays: sigmoid and SiLU (Elfwing et al. 2018; "swish")."""
from ..backend import get_array_module


def sigmoid(x):
    """1 / (1 + e^-x) without overflow: only exp(-|x|) <= 1 is ever computed."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def silu_forward(x):
    """y = x sigmoid(x) -> (y, s) with s = sigmoid(x), which the backward needs."""
    s = sigmoid(x)
    return x * s, s


def silu_backward(grad, x, s):
    """dy/dx = s + x s (1 - s) = s (1 + x (1 - s))."""
    return grad * s * (1 + x * (1 - s))
