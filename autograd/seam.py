"""The one seam between the plain engine and autograd/fast, its faster twins.

The engine's heavy array work is done by plain functions on NumPy or CuPy
arrays, written to be read (autograd/kernels/, the optimizers' updates). Those
a faster version may replace are marked `@swappable` where they are defined:

    @swappable
    def conv2d_forward(x, w, b, stride, padding): ...

Calling `conv2d_forward(...)` runs the plain function unless a faster twin of
the same name has been installed. Only autograd/fast installs twins (through
`install`, when `autograd.fast.enable()` runs, which `import autograd` does
unless AUTOGRAD_FAST=0); its tests hold every twin equal to the plain
function, which stays reachable as `conv2d_forward.plain`. Nothing else in
the engine knows the fast layer exists.
"""
import functools

_plain = {}     # name -> the plain function
_twins = {}     # name -> the faster twin installed in its place, if any


def swappable(fn):
    """Mark a kernel that autograd/fast may replace by a twin of the same name and signature."""
    name = fn.__name__
    if name in _plain:
        raise ValueError(f"two swappable kernels named {name!r}")
    _plain[name] = fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _twins.get(name, fn)(*args, **kwargs)

    call.plain = fn
    return call


def current(kernel):
    """The function a swappable kernel runs now: its installed twin, else its plain body."""
    return _twins.get(kernel.__name__, kernel.plain)


def install(twins):
    """Run each twin ({name: function}) in place of the plain kernel of that name."""
    unknown = sorted(set(twins) - set(_plain))
    if unknown:
        raise KeyError(f"no swappable kernel named {', '.join(unknown)}")
    _twins.update(twins)


def uninstall():
    """Back to the plain kernels everywhere."""
    _twins.clear()


def installed():
    """{name: twin} of the twins in use now."""
    return dict(_twins)


def plain_kernels():
    """{name: plain function} of every swappable kernel."""
    return dict(_plain)
