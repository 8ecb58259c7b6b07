"""autograd: a small reverse-mode automatic differentiation engine over NumPy and CuPy.

    from autograd import Tensor, no_grad
    import autograd.functional as F

`tensor.py` holds the engine (Tensor, Function, backward); `functional.py`
the ops a network is built from, whose array work is done by the plain
kernels of `kernels/`; `nn.py` layers; `optim.py` optimizers; `gradcheck.py`
the finite-difference check every op is tested with; `backend.py` is the
only place that knows about CuPy.

`fast/` holds faster twins of the kernels. This file installs them through
the one seam the engine has (`seam.py`), unless the environment says
AUTOGRAD_FAST=0; `autograd.fast.enable()` and `disable()` switch at run time.
The engine and its tests run the same either way, only slower without them.
"""
from .tensor import Tensor, Function, no_grad, is_grad_enabled
from .gradcheck import gradcheck, GradcheckError
from .backend import manual_seed
from . import functional, nn, optim
from . import fast

if fast.enabled_by_environment():
    fast.enable()

__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "gradcheck", "GradcheckError",
           "manual_seed", "functional", "nn", "optim", "fast"]
