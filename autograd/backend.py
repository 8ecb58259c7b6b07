"""NumPy or CuPy: the one module that knows CuPy exists.

Every kernel asks this module for the array module of its inputs (`xp`, as
`cupy.get_array_module` does) and then calls only names that NumPy and CuPy
share, so one code path serves the CPU and the GPU. Everything else in the
project stays importable and testable on a machine without CuPy or a GPU.
(autograd/fast's CUDA code takes `cupy` from here too.)
"""
import importlib

import numpy as np

try:  # CuPy is optional: `pip install tinyddpm[cuda12]` or `[cuda13]`
    import cupy
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy raises its own runtime errors
        return False


def cuda_unavailable_reason():
    """Why `.to("cuda")` cannot work here, in one sentence (None when it can)."""
    if cupy is None:
        return ("CuPy is not installed; install the GPU extra, e.g. "
                "pip install -e '.[cuda12]' (or '.[cuda13]')")
    if not cupy_available():
        return "CuPy is installed but no CUDA device is visible"
    return None


def cuda_library(name):
    """One of CuPy's own modules by its dotted name (e.g. "cupy_backends.cuda.libs.cublas"),
    for autograd/fast's CUDA code, so that CuPy is imported here alone."""
    if cupy is None:
        raise RuntimeError(cuda_unavailable_reason())
    return importlib.import_module(name)


def get_array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for scalars)."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return np


def is_cuda_array(a):
    return cupy is not None and isinstance(a, cupy.ndarray)


def device_of(a):
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cuda" if is_cuda_array(a) else "cpu"


def to_device(a, device):
    """Move an array to 'cpu' or 'cuda', copying only when it must change place."""
    if device == "cpu":
        return cupy.asnumpy(a) if is_cuda_array(a) else a
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot move to 'cuda': {reason}")
        return cupy.asarray(a)
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def to_numpy(a):
    """A host (NumPy) copy or view of any backend array."""
    return cupy.asnumpy(a) if is_cuda_array(a) else np.asarray(a)


def array_module_for_device(device):
    if device == "cpu":
        return np
    to_device(np.zeros(0), device)  # raises the clear error when CUDA is unusable
    return cupy


# =============================================================================
# Random generators
# =============================================================================

def default_rng(seed=None, device="cpu"):
    """A seedable random generator on the given device.

    NumPy's and CuPy's `Generator` share the methods the project uses
    (`standard_normal`, `random`, `integers`), so code that receives a
    generator never needs to know where it draws.
    """
    return array_module_for_device(device).random.default_rng(seed)


# One global generator per device for ops that draw when no generator is
# passed (dropout). `manual_seed` resets them, so a seeded run repeats exactly.
_global_rngs = {}


def manual_seed(seed):
    """Seed the global generators of every device (those already made are replaced)."""
    _global_rngs.clear()
    _global_rngs["seed"] = seed


def seed_global_rng(seed, device="cpu"):
    """Replace one device's global generator with default_rng(seed) (seed: an int or a list of ints)."""
    _global_rngs[device] = default_rng(seed, device)


def global_rng(device="cpu"):
    if device not in _global_rngs:
        seed = _global_rngs.get("seed")
        # Different streams per device from one seed: the device name's length is mixed in.
        _global_rngs[device] = default_rng(None if seed is None else [seed, len(device)], device)
    return _global_rngs[device]
