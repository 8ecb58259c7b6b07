"""Adam, the EMA and gradient clipping on flat buffers: twins of autograd/optim.py's loops.

On a GPU a training step is bound by the host issuing kernels, and a loop
over the parameters (the mnist UNet has about 160 arrays) launches a few
for each one. Here all the parameters are views of one contiguous 1-D array,
and so are Adam's moments, the EMA's shadow and, once gathered, the
gradients, so each update is a handful of kernels over one long array. On a
CPU the arithmetic, not the calls, is the cost, so there the EMA and the
clipping run the plain loops and Adam a loop of its own, with the bias
corrections folded into the step size (fewer passes over memory, the same
update up to rounding); `use_flat` says where each runs, and the tests force
the flat buffers on NumPy.

A buffer is flat when it is one contiguous 1-D array and a list of views of
it, consecutive and in parameter order, fills it: view i shaped like
parameter i. The first flat step copies the values of each list it is given
(the moments, the shadow) into a flat buffer and puts the views in the list
in place of the arrays (the plain optimizers read their state from these
lists, so they see the same values); it does the same with the parameters'
`.data`. Gradients are gathered into one buffer each step (one concatenate)
and `p.grad` rebound to views, so that clipping, which scales the buffer,
scales the `.grad` that Adam or a caller reads.

Anything may rebind `p.data` afterwards (Module.to, a user's assignment), so
each step checks the arrays: where they are the views handed out, the buffer
is reused; where they are themselves the views of one buffer (another flat
owner flattened them), that one is used; otherwise one is made again from
their current values. Parameters of mixed dtypes or devices go through the
plain loop.
"""
import math

from .. import backend
from ..optim import clip_grad_norm as plain_clip, ema_update as plain_ema
from .cuda import elementwise

# None: flat on a GPU, loops on a CPU; True or False: always or never (tests set it).
FLAT = {"mode": None}


def use_flat(arrays):
    """Whether the twins work on flat buffers for these arrays (one dtype, one device, none twice)."""
    mode = FLAT["mode"]
    if mode is False or not arrays or (mode is None and not backend.is_cuda_array(arrays[0])):
        return False
    return (len({a.dtype for a in arrays}) == 1
            and len({backend.device_of(a) for a in arrays}) == 1
            and len({id(a) for a in arrays}) == len(arrays))


# =============================================================================
# The twins
# =============================================================================

def adam_update(params, ms, vs, lr, betas, eps, weight_decay, t):
    b1, b2 = betas
    # Both bias corrections folded into one step size, lr sqrt(1-b2^t) / (1-b1^t), and eps
    # scaled to match: lr m_hat / (sqrt(v_hat) + eps) without the m_hat and v_hat temporaries.
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    step_size, eps_hat = lr * math.sqrt(c2) / c1, eps * math.sqrt(c2)
    datas = [p.data for p in params]
    if not use_flat(datas) or any(_grad_missing(p) for p in params):
        # One parameter at a time (a CPU; or a parameter without a gradient, which the loop
        # skips where a zero gradient in its place would still move it).
        for p, m, v in zip(params, ms, vs):
            if p.grad is not None:
                _adam(p.data, p.grad, m, v, b1, b2, step_size, eps_hat, weight_decay)
        return
    _adam(flatten_params(params), gather_grads(params), flatten_in_place(ms), flatten_in_place(vs),
          b1, b2, step_size, eps_hat, weight_decay)


def _adam(p, g, m, v, b1, b2, step_size, eps_hat, weight_decay):
    cast = p.dtype.type
    if weight_decay:
        g = g + cast(weight_decay) * p
    _adam_flat(p, g, m, v, cast(b1), cast(1 - b1), cast(b2), cast(1 - b2), cast(step_size), cast(eps_hat))


def ema_update(shadows, params, decay):
    datas = [p.data for p in params]
    if not use_flat(datas) or len(shadows) != len(params):
        return plain_ema.plain(shadows, params, decay)
    s, p = flatten_in_place(shadows), flatten_params(params)
    d = s.dtype.type(decay)
    _ema_flat(s, p, d, 1 - d)


def clip_grad_norm(params, max_norm):
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad or not use_flat([p.grad for p in with_grad]):
        return plain_clip.plain(params, max_norm)
    g = gather_grads(with_grad)
    xp = backend.get_array_module(g)
    total = xp.sqrt(xp.vdot(g, g))          # the loop's sum of squares, in another order
    g *= xp.where(total > max_norm, max_norm / (total + 1e-6), xp.ones_like(total)).astype(g.dtype)
    return total


def _grad_missing(p):
    return p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype


@elementwise
def _adam_flat(xp):
    """Adam's update of one array (the flat buffer of all, on a GPU), in place: one kernel on a GPU."""
    def update(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, step_size, eps_hat):
        m *= b1
        m += one_minus_b1 * g
        v *= b2
        v += one_minus_b2 * (g * g)
        p -= step_size * m / (xp.sqrt(v) + eps_hat)
    return update


@elementwise
def _ema_flat(xp):
    """shadow <- d shadow + (1 - d) p over the flat buffer, in place: one kernel on a GPU."""
    def update(shadow, p, d, one_minus_d):
        shadow *= d
        shadow += one_minus_d * p
    return update


# =============================================================================
# Flat buffers
# =============================================================================

def found_flat(arrays):
    """The 1-D buffer the arrays fill as consecutive views, in order, or None."""
    base = arrays[0].base       # NumPy and CuPy point a view of a view at the array first cut
    if type(base) is not type(arrays[0]) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    start = end = _address(arrays[0])
    for a in arrays:
        if a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous \
                or _address(a) != end:
            return None
        end += a.nbytes
    first = (start - _address(base)) // base.itemsize
    return base[first:first + (end - start) // base.itemsize]


def flat_copy(arrays):
    """(buffer, views): a new flat buffer holding copies of the arrays' values."""
    xp = backend.get_array_module(arrays[0])
    buffer = xp.concatenate([a.ravel() for a in arrays])
    views, offset = [], 0
    for a in arrays:
        views.append(buffer[offset:offset + a.size].reshape(a.shape))
        offset += a.size
    return buffer, views


def flatten_in_place(arrays):
    """The flat buffer behind a list of arrays, made (and the list's items replaced by
    its views) where they are not one already."""
    buffer = found_flat(arrays)
    if buffer is None:
        buffer, views = flat_copy(arrays)
        arrays[:] = views
    return buffer


def flatten_params(params):
    """The flat buffer behind the parameters' `.data`, rebinding `.data` where needed."""
    datas = [p.data for p in params]
    buffer = flatten_in_place(datas)
    for p, view in zip(params, datas):
        p.data = view
    return buffer


def gather_grads(params):
    """The parameters' gradients (none missing) as one flat buffer, each `.grad` a view of it."""
    grads = [p.grad for p in params]
    buffer = flatten_in_place(grads)
    for p, view in zip(params, grads):
        p.grad = view
    return buffer


def _address(a):
    """Where an array's first element lives (a device address for a CuPy array)."""
    return a.data.ptr if backend.is_cuda_array(a) else a.__array_interface__["data"][0]
