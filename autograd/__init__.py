"""autograd: a small reverse-mode automatic differentiation engine over NumPy and CuPy.

    from autograd import Tensor, no_grad
    import autograd.functional as F

`tensor.py` holds the engine (Tensor, Function, backward); `functional.py`
the ops a network is built from; `nn.py` layers; `optim.py` optimizers;
`gradcheck.py` the finite-difference check every op is tested with;
`backend.py` is the only place that knows about CuPy.
"""
from .tensor import Tensor, Function, no_grad, is_grad_enabled
from .gradcheck import gradcheck, GradcheckError
from .backend import manual_seed
from . import functional, nn, optim

__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "gradcheck", "GradcheckError",
           "manual_seed", "functional", "nn", "optim"]
