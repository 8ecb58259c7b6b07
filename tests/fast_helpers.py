"""What the tests of autograd/fast share: the thread count, the chunk sizes, the switch.

The fast kernels go through a batch a few images at a time, on the fast
layer's threads (autograd/fast/threads.py). Their tests turn both knobs
(how many threads, how many images per chunk) and expect the same numbers
every way, and the plain kernel's (autograd/kernels/) to rounding.
Fixtures here are imported by the test files that use them.
"""
import numpy as np
import pytest

from autograd import fast, seam
from autograd.fast import attention as fast_attention, conv_cpu, norm_cpu, threads

needs_threadpoolctl = pytest.mark.skipif(threads._blas() is None,
                                         reason="threadpoolctl cannot steer this NumPy's BLAS")

# A UNet of a few thousand parameters on 8x8 images: every kind of block, in milliseconds.
TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)


@pytest.fixture
def set_threads():
    """set_threads(n): the kernels on n threads inside a test; the previous count comes back after it."""
    before = threads.num_threads()
    yield threads.set_num_threads
    threads.set_num_threads(before)


@pytest.fixture
def fast_on():
    """The fast layer's twins installed for the test (whatever AUTOGRAD_FAST says), as before after it."""
    before = seam.installed()
    fast.enable()
    yield
    seam.uninstall()
    seam.install(before)


def images_per_chunk(monkeypatch, k):
    """Make every chunked CPU kernel take k images (examples) per chunk: with a
    batch of 9 and k = 4 the last chunk is shorter, with k = 1 there are 9."""
    monkeypatch.setattr(conv_cpu, "_chunk", lambda B, *args: min(B, k))
    monkeypatch.setattr(norm_cpu, "_chunk", lambda x3: min(x3.shape[0], k))
    monkeypatch.setattr(fast_attention, "_chunks", lambda q, kk: (min(q.shape[0], k), -(-q.shape[0] // k)))


# Every path of the CPU convolution (fast/conv_cpu.py), each in a batch of 9
# (one of 1) so that chunks of 4 leave a shorter last one.
CONV_CASES = [
    # x shape, w shape, stride, padding, with bias
    ((9, 4, 12, 12), (6, 4, 3, 3), 1, 1, True),      # im2col path; backward from dL/dy's patches
    ((9, 3, 7, 7), (4, 3, 3, 3), 1, 2, True),        # padding k - 1: output larger, dL/db summed apart
    ((9, 4, 12, 12), (6, 4, 5, 5), 1, 2, True),      # 5x5 "same"
    ((9, 12, 28, 28), (5, 12, 3, 3), 1, 1, True),    # output-side path (C_in >= 2 C_out, 28x28)
    ((9, 4, 13, 11), (6, 4, 3, 3), 2, 1, False),     # stride 2: strided adds for dL/dx
    ((9, 5, 9, 9), (3, 5, 3, 3), 2, 1, True),        # stride 2 with a bias (its row of ones)
    ((9, 3, 11, 10), (4, 3, 3, 2), 3, 1, False),     # stride 3, non-square: phases of 1 or 0 taps
    ((9, 6, 7, 7), (5, 6, 1, 1), 1, 0, True),        # 1x1: a matrix product per image
    ((9, 3, 8, 8), (4, 3, 3, 3), 1, 0, False),       # no padding
    ((9, 4, 10, 9), (5, 4, 3, 2), 1, 1, True),       # non-square kernel: dL/dx by strided adds
    ((9, 3, 6, 6), (4, 3, 3, 3), 1, 3, False),       # padding > k - 1: dL/dx by strided adds
    ((9, 6, 8, 8), (5, 6, 1, 1), 2, 0, True),        # 1x1 with stride 2 (the im2col path)
    ((1, 4, 12, 12), (6, 4, 3, 3), 1, 1, True),      # a batch of one
    ((9, 12, 30, 32), (5, 12, 3, 3), 1, 0, False),   # output-side path, non-square, no padding
]
CONV_IDS = [f"{x}*{w} s{s} p{p}{' +b' if b else ''}" for x, w, s, p, b in CONV_CASES]


def conv_arrays(x_shape, w_shape, stride, padding, bias, dtype=np.float64, seed=0):
    """x, w, b (or None) and a cotangent dL/dy of the output's shape, standard normal."""
    from autograd.kernels.conv import output_size
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    Ho = output_size(x_shape[2], w_shape[2], stride, padding)
    Wo = output_size(x_shape[3], w_shape[3], stride, padding)
    g = rng.standard_normal((x_shape[0], w_shape[0], Ho, Wo)).astype(dtype)
    return x, w, b, g


def assert_all_equal(actual, expected):
    """Two sequences of arrays (or Nones), equal bit for bit, dtypes included."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"item {i}: expected None"
            continue
        assert a.dtype == e.dtype, f"item {i}: dtype {a.dtype}, expected {e.dtype}"
        np.testing.assert_array_equal(a, e, err_msg=f"item {i}")
