"""Tests for autograd/tensor.py: every Tensor operator and method checked three
ways (float64 gradcheck, forward against NumPy, float32 in and out), the rules
of the backward walk, dtype and input errors, and property tests of shapes.

Each row of a table below is one op case; tests/helpers.py runs the checks.
"""
import random
import re
import types
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autograd import Function, Tensor, backend, is_grad_enabled, no_grad
from helpers import case, check_float32, check_forward, check_gradient, randn


def same(id, expr, *shapes, positive=False, marks=()):
    """A case whose oracle is the same expression evaluated by NumPy on plain arrays."""
    return case(id, expr, expr, *shapes, positive=positive, marks=marks)


def reduction(name, axis, keepdims, shape=(2, 3, 4)):
    return same(f"{name}(axis={axis}, keepdims={keepdims})",
                lambda a: getattr(a, name)(axis=axis, keepdims=keepdims), shape)


def index(id, idx, shape=(3, 4)):
    return same(f"index {id}", lambda a: a[idx], shape)


# float64 NumPy constants: combined with a float32 tensor they must not upcast it.
C4 = np.linspace(-1.5, 2.0, 4)
P4 = np.linspace(0.5, 2.0, 4)
M23 = np.arange(6.0).reshape(2, 3) / 5 - 0.4
MASK34 = np.arange(12).reshape(3, 4) % 3 == 1

CASES = [
    # + - * / with broadcasting both ways
    same("add", lambda a, b: a + b, (3, 4), (3, 4)),
    same("add broadcast rhs", lambda a, b: a + b, (2, 3, 4), (4,)),
    same("add broadcast lhs", lambda a, b: a + b, (3, 1), (2, 3, 4)),
    same("add broadcast both ways", lambda a, b: a + b, (3, 1), (1, 4)),
    same("add 0-d", lambda a, b: a + b, (), (3, 4)),
    same("sub broadcast both ways", lambda a, b: a - b, (2, 1, 4), (3, 1)),
    same("mul broadcast both ways", lambda a, b: a * b, (4, 1, 5), (3, 1)),
    same("mul 0-d by 0-d", lambda a, b: a * b, (), ()),
    same("mul by itself", lambda a: a * a, (3, 4)),
    same("div broadcast both ways", lambda a, b: a / b, (3, 1), (1, 4), positive=True),
    same("neg", lambda a: -a, (3, 4)),
    # reflected forms and constants: Python scalars, NumPy arrays and scalars
    same("scalar + x", lambda a: 2.5 + a, (3, 4)),
    same("scalar - x", lambda a: 2.5 - a, (3, 4)),
    same("x - scalar", lambda a: a - 2.5, (3, 4)),
    same("scalar * x", lambda a: 2.5 * a, (3, 4)),
    same("scalar / x", lambda a: 2.0 / a, (3, 4), positive=True),
    same("x / scalar", lambda a: a / 4.0, (3, 4)),
    same("x + array", lambda a: a + C4, (3, 4)),
    same("array + x", lambda a: C4 + a, (3, 4)),
    same("array - x", lambda a: C4 - a, (3, 4)),
    same("array * x", lambda a: C4 * a, (3, 4)),
    same("array / x", lambda a: C4 / a, (3, 4), positive=True),
    same("x / array", lambda a: a / P4, (3, 4)),
    same("x + 0-d array", lambda a: a + np.array(1.0), (3, 4)),
    same("x * np.float64", lambda a: a * np.float64(1.5), (3, 4)),
    same("np.float64 * x", lambda a: np.float64(1.5) * a, (3, 4)),
    # powers
    same("x ** 3", lambda a: a ** 3, (3, 4)),
    same("x ** 0.5", lambda a: a ** 0.5, (3, 4), positive=True),
    same("x ** -1.5", lambda a: a ** -1.5, (3, 4), positive=True),
    same("x ** tensor", lambda a, b: a ** b, (3, 4), (3, 4), positive=True),
    same("x ** tensor broadcast", lambda a, b: a ** b, (3, 4), (4,), positive=True),
    # matrix product
    same("matmul", lambda a, b: a @ b, (3, 4), (4, 5)),
    same("matmul batched", lambda a, b: a @ b, (2, 3, 4), (2, 4, 5)),
    same("matmul batch broadcast", lambda a, b: a @ b, (2, 1, 3, 4), (3, 4, 5)),
    same("matmul vector @ matrix", lambda a, b: a @ b, (4,), (4, 5)),
    same("matmul matrix @ vector", lambda a, b: a @ b, (3, 4), (4,)),
    same("matmul vector @ vector", lambda a, b: a @ b, (4,), (4,)),
    same("array @ x", lambda a: M23 @ a, (3, 4)),
    # element-wise functions
    case("exp", lambda a: a.exp(), np.exp, (3, 4)),
    case("log", lambda a: a.log(), np.log, (3, 4), positive=True),
    case("sqrt", lambda a: a.sqrt(), np.sqrt, (3, 4), positive=True),
    case("maximum broadcast", lambda a, b: a.maximum(b), np.maximum, (3, 4), (4,)),
    case("maximum scalar", lambda a: a.maximum(0.0), lambda a: np.maximum(a, 0.0), (3, 4)),
    # a cast there and back: float64 and float32 graphs must both come back in their dtype
    same("astype round trip", lambda a: (a.astype(np.float64) * 3.0).astype(a.dtype), (3, 4)),
    # reductions
    *[reduction(name, axis, keepdims) for name in ("sum", "mean")
      for axis, keepdims in [(None, False), (None, True), (1, False), (-1, True),
                             ((0, 2), False), ((-1, -3), True)]],
    reduction("sum", None, False, shape=()),
    reduction("mean", 0, False, shape=(1,)),
    # shapes
    same("reshape", lambda a: a.reshape(6, 4), (2, 3, 4)),
    same("reshape tuple with -1", lambda a: a.reshape((4, -1)), (2, 3, 4)),
    same("transpose reversed", lambda a: a.transpose(), (2, 3, 4)),
    same("transpose permutation", lambda a: a.transpose(1, 0, 2), (2, 3, 4)),
    same("transpose negative axes", lambda a: a.transpose((-1, 0, 1)), (2, 3, 4)),
    same("T", lambda a: a.T, (3, 4)),
    # indexing: basic slices, steps, integer arrays whose repeats must add
    index("int", 1),
    index("negative int", -1),
    index("slice", slice(1, 3)),
    index("steps", (slice(None, None, 2), slice(1, None, 2))),
    index("negative step", (slice(None, None, -1), slice(3, 0, -2))),
    index("ellipsis and None", (Ellipsis, None, 1)),
    index("repeated int array", np.array([0, 2, 0, 0])),
    index("repeated index pairs", (np.array([0, 0, 1]), np.array([2, 2, 3]))),
    index("slice and repeated list", (slice(1, None), [0, 0, 3])),
    index("boolean mask", MASK34),
]

# The adjoint test at the sizes the UNet works at (8 x 64 x 14 x 14 maps).
REALISTIC = [
    same("add broadcast", lambda a, b: a + b, (8, 64, 14, 14), (1, 64, 1, 1)),
    same("mul broadcast", lambda a, b: a * b, (8, 64, 14, 14), (64, 1, 1)),
    same("div broadcast", lambda a, b: a / b, (64, 196), (196,), positive=True),
    same("matmul batch broadcast", lambda a, b: a @ b, (4, 64, 128), (128, 96)),
    same("x ** tensor", lambda a, b: a ** b, (64, 196), (64, 196), positive=True),
    case("exp log sqrt", lambda a: a.exp().log().sqrt() + a.log(), None, (64, 196), positive=True),
    case("maximum", lambda a, b: a.maximum(b), None, (64, 196), (196,)),
    reduction("sum", (0, 2, 3), True, shape=(8, 64, 14, 14)),
    reduction("mean", -1, False, shape=(8, 64, 196)),
    same("transpose reshape", lambda a: a.transpose(0, 2, 1).reshape(8 * 196, 64), (8, 64, 196)),
    index("repeated rows", np.random.default_rng(0).integers(0, 256, 1000), shape=(256, 64)),
]


@pytest.mark.parametrize("c", CASES)
def test_gradient_matches_finite_differences(c):
    check_gradient(c, mode="elements")


@pytest.mark.parametrize("c", CASES)
def test_forward_matches_numpy(c):
    check_forward(c)


@pytest.mark.parametrize("c", CASES)
def test_float32_in_float32_out(c):
    check_float32(c)


@pytest.mark.parametrize("c", REALISTIC)
def test_adjoint_gradient_check_at_realistic_size(c):
    check_gradient(c, mode="adjoint")


def test_repeated_integer_indices_add_their_gradients():
    x = Tensor(np.zeros(4), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0, 0.0])


def test_tensor_integer_index_works_like_an_array():
    x = randn(4, 3)
    x[Tensor(np.array([1, 1, 3]))].sum().backward()
    np.testing.assert_array_equal(x.grad, np.array([0, 2, 0, 1])[:, None] * np.ones((4, 3)))


def test_maximum_gives_a_tie_to_the_first_input():
    a, b = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    a.maximum(b).sum().backward()
    np.testing.assert_array_equal(a.grad, np.ones(3))
    np.testing.assert_array_equal(b.grad, np.zeros(3))


def test_x_to_the_power_0_has_gradient_0_everywhere():
    x = Tensor(np.array([0.0, 2.0]), requires_grad=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])


def test_astype_returns_the_gradient_in_the_input_dtype():
    x = randn(3, dtype=np.float32)
    y = x.astype(np.float64)
    assert y.dtype == np.float64
    (y * 2.0).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, np.full(3, 2.0, np.float32))


# =============================================================================
# The backward walk (the rules in tensor.py's docstring)
# =============================================================================

class CountingIdentity(Function):
    """y = x, remembering every gradient its backward receives."""

    def __init__(self):
        self.received = []

    def forward(self, x):
        return x

    def backward(self, grad):
        self.received.append(grad.copy())
        return grad


def test_node_feeding_two_consumers_gets_both_contributions_at_once():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    op = CountingIdentity()
    h = op(x)
    # A short path (h) and a long one (h * 2 * 3 * 4) meet again at the sum:
    # the walk must reach h only after both, so its backward runs once with 1 + 24.
    (h + ((h * 2.0) * 3.0) * 4.0).sum().backward()
    assert len(op.received) == 1
    np.testing.assert_array_equal(op.received[0], [25.0, 25.0])
    np.testing.assert_array_equal(x.grad, [25.0, 25.0])


def test_diamond_graph_gradient():
    x = Tensor(np.array([0.5, 2.0]), requires_grad=True)
    h = x * 3.0
    (h * h + h.exp()).sum().backward()  # d/dx = 3 (2h + e^h)
    np.testing.assert_allclose(x.grad, 3 * (2 * h.data + np.exp(h.data)))


def test_gradients_accumulate_across_backward_calls_until_reset():
    x = Tensor(np.ones(3), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0, 5.0])
    x.grad = None
    (x * 4.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [4.0, 4.0, 4.0])
    x.zero_grad()
    assert x.grad is None


def test_intermediates_keep_no_grad():
    x = randn(3)
    h = x * 2.0
    y = h.sum()
    y.backward()
    assert x.grad is not None
    assert h.grad is None and y.grad is None


def test_second_backward_through_the_same_graph_raises():
    x = randn(3)
    h = x.exp()
    y = h.sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already"):
        y.backward()
    with pytest.raises(RuntimeError, match="already"):
        (h * 2.0).sum().backward()   # a new graph on top of a used one


def test_no_grad_builds_nothing():
    x = randn(3)
    with no_grad():
        y = (x * 2.0 + 1.0).exp().sum()
    assert not y.requires_grad
    assert y._ctx is None
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_nests_and_restores():
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()
    assert is_grad_enabled()
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("inside")
    assert is_grad_enabled()
    assert (randn(2) * 2.0).requires_grad


def test_backward_on_a_non_scalar_needs_a_gradient():
    y = randn(2, 3) * 2.0
    with pytest.raises(RuntimeError, match=re.escape("(2, 3)")):
        y.backward()


def test_backward_with_a_gradient_of_the_wrong_shape_raises():
    y = randn(2, 3) * 2.0
    with pytest.raises(ValueError, match=re.escape("(3, 2)")):
        y.backward(np.ones((3, 2)))


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(())).backward()


def test_chain_of_100000_ops_backpropagates_without_recursion_error():
    x = Tensor(np.array(1.0), requires_grad=True)
    c = Tensor(np.array(1.00001))
    y = x
    for _ in range(100_000):
        y = y * c
    y.backward()
    np.testing.assert_allclose(x.grad, 1.00001 ** 100_000, rtol=1e-9)


@pytest.mark.parametrize("with_gradient", [True, False], ids=["explicit gradient", "scalar loss"])
def test_leaf_grads_are_not_aliased(with_gradient):
    a, b = randn(2, 3, seed=1), randn(2, 3, seed=2)
    g = np.ones((2, 3))
    if with_gradient:
        (a + b).backward(g)
    else:
        (a + b).sum().backward()
    assert a.grad is not b.grad and a.grad is not g
    a.grad += 1.0
    np.testing.assert_array_equal(b.grad, np.ones((2, 3)))
    np.testing.assert_array_equal(g, np.ones((2, 3)))


ZERO3 = Tensor(np.zeros(3))
GRAPH_STEPS = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: -a,
               lambda a, b: a.sum() + ZERO3, lambda a, b: a.mean() + ZERO3,
               lambda a, b: a.reshape(3, 1).reshape(3)]


def test_leaf_grads_stay_writable_arrays_of_their_own_in_random_graphs():
    # Many small graphs that reuse tensors, reduce them and broadcast them back.
    # A wrong leaf gradient depends on which memory CPython reuses, so it takes many graphs to show.
    rng = random.Random(0)
    for _ in range(2000):
        leaves = [Tensor(np.ones(3), requires_grad=True) for _ in range(2)]
        pool = list(leaves)
        for _ in range(rng.randint(2, 8)):
            pool.append(rng.choice(GRAPH_STEPS)(rng.choice(pool), rng.choice(pool)))
        sum(pool[2:], pool[-1]).sum().backward()
        grads = [x.grad for x in leaves if x.grad is not None]
        for g in grads:
            assert g.flags.writeable and 0 not in g.strides, "a leaf kept a broadcast view as .grad"
        assert len(grads) < 2 or not np.shares_memory(*grads)


def test_saved_arrays_are_freed_after_backward():
    x = randn(64, 64)
    refs = []

    def loss_of(x):
        h = (x * 2.0).exp()       # Exp saves its output; h * h saves h twice
        refs.extend([weakref.ref(h), weakref.ref(h.data)])
        return (h * h).mean()

    loss = loss_of(x)
    assert all(r() is not None for r in refs), "the graph should hold h until backward"
    loss.backward()
    assert all(r() is None for r in refs), "backward left the intermediate alive"


def test_zero_d_and_size_one_tensors():
    x = Tensor(np.array(3.0), requires_grad=True)
    y = x * x + x
    assert y.shape == ()
    y.backward()
    assert x.grad.shape == ()
    assert x.grad == 7.0
    z = Tensor(np.array([[2.0]]), requires_grad=True)
    (z * z).backward()            # one element: the gradient 1 is implied
    np.testing.assert_array_equal(z.grad, [[4.0]])


# =============================================================================
# dtypes: float32 stays float32
# =============================================================================

@pytest.mark.parametrize("expr", [
    pytest.param(lambda x: x * np.float64(2), id="x * np.float64"),
    pytest.param(lambda x: np.float64(2) * x, id="np.float64 * x"),
    pytest.param(lambda x: x + np.array(1.0), id="x + 0-d float64 array"),
    pytest.param(lambda x: np.array(1.0) + x, id="0-d float64 array + x"),
    pytest.param(lambda x: x - np.ones(4), id="x - float64 array"),
    pytest.param(lambda x: 2.0 / x, id="scalar / x"),
    pytest.param(lambda x: x ** 2.0, id="x ** python float"),
    pytest.param(lambda x: x ** np.float64(2), id="x ** np.float64"),
    pytest.param(lambda x: x.maximum(np.float64(0)), id="maximum np.float64"),
    pytest.param(lambda x: x @ np.ones((4, 2)), id="x @ float64 array"),
    pytest.param(lambda x: x.mean() * 3, id="mean times int"),
])
def test_constants_never_upcast_a_float32_graph(expr):
    x = Tensor(np.full((3, 4), 1.5, np.float32), requires_grad=True)
    y = expr(x)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape, np.float32))
    assert x.grad.dtype == np.float32


def test_python_floats_make_float32_tensors():
    assert Tensor(1.5).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.ones(2)).dtype == np.float64   # an explicit float64 array is kept


@pytest.mark.parametrize("op", [
    pytest.param(lambda a, b: a + b, id="+"),
    pytest.param(lambda a, b: b + a, id="+ reflected"),
    pytest.param(lambda a, b: a - b, id="-"),
    pytest.param(lambda a, b: a * b, id="*"),
    pytest.param(lambda a, b: a / b, id="/"),
    pytest.param(lambda a, b: a @ b, id="@"),
    pytest.param(lambda a, b: a ** b, id="** tensor"),
    pytest.param(lambda a, b: a.maximum(b), id="maximum"),
])
def test_mixing_float32_and_float64_tensors_raises(op):
    a = Tensor(np.ones((3, 3), np.float32), requires_grad=True)
    b = Tensor(np.ones((3, 3), np.float64), requires_grad=True)
    with pytest.raises(TypeError) as excinfo:
        op(a, b)
    assert "float32" in str(excinfo.value) and "float64" in str(excinfo.value)


# =============================================================================
# Bad input
# =============================================================================

@pytest.mark.parametrize("data", [np.arange(3), [1, 2, 3], np.array([True, False])],
                         ids=["int array", "int list", "bool array"])
def test_only_float_tensors_can_require_grad(data):
    with pytest.raises(TypeError, match="floating"):
        Tensor(data, requires_grad=True)


@pytest.mark.parametrize("axes", [(0, 0, 1), (0, 1), (0, 1, 2, 3)])
def test_transpose_with_a_bad_permutation_raises(axes):
    with pytest.raises(ValueError, match="permutation"):
        randn(2, 3, 4).transpose(axes)


def test_matmul_with_mismatched_shapes_names_them():
    with pytest.raises(ValueError, match=re.escape("(3, 4) and (5, 2)")):
        randn(3, 4) @ randn(5, 2)


def test_to_cuda_without_cupy_says_cupy_is_missing(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        randn(2).to("cuda")


def test_to_cuda_without_a_device_says_no_device(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorNoDevice")
    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    fake_cupy = types.SimpleNamespace(ndarray=type("FakeCupyArray", (), {}),
                                      cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "cupy", fake_cupy)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        randn(2).to("cuda")


@pytest.mark.skipif(backend.cupy_available(), reason="this machine has a GPU")
def test_to_cuda_on_this_machine_explains_why_not():
    expected = "CuPy is not installed" if backend.cupy is None else "no CUDA device"
    with pytest.raises(RuntimeError, match=expected):
        randn(2).to("cuda")


def test_to_an_unknown_device_raises():
    with pytest.raises(ValueError, match="tpu"):
        randn(2).to("tpu")


# =============================================================================
# Properties of shapes and broadcasting (hypothesis)
# =============================================================================

def sum_over_broadcast(g, shape):
    """Each element of an array of `shape`, broadcast to g.shape, collects the g of all its copies."""
    n = int(np.prod(shape))
    owner = np.broadcast_to(np.arange(n).reshape(shape), g.shape)
    return np.bincount(owner.ravel(), weights=g.ravel(), minlength=n).reshape(shape)


# op: (NumPy forward, local derivatives d out/d a and d out/d b)
BINARY = {
    "add": (np.add, lambda a, b: (np.ones_like(a), np.ones_like(b))),
    "sub": (np.subtract, lambda a, b: (np.ones_like(a), -np.ones_like(b))),
    "mul": (np.multiply, lambda a, b: (b, a)),
    "div": (np.divide, lambda a, b: (1 / b, -a / b ** 2)),
    "maximum": (np.maximum, lambda a, b: (a >= b, a < b)),
}
TENSOR_BINARY = {"add": Tensor.__add__, "sub": Tensor.__sub__, "mul": Tensor.__mul__,
                 "div": Tensor.__truediv__, "maximum": Tensor.maximum}
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


@PROPERTY_SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=3),
       name=st.sampled_from(sorted(BINARY)), seed=st.integers(0, 2**16))
def test_broadcast_gradients_sum_over_the_broadcast_axes(shapes, name, seed):
    rng = np.random.default_rng(seed)
    (a_shape, b_shape), out_shape = shapes.input_shapes, shapes.result_shape
    a_np = rng.standard_normal(a_shape)
    b_np = rng.uniform(0.5, 2.0, b_shape)
    a, b = Tensor(a_np, requires_grad=True), Tensor(b_np, requires_grad=True)
    forward, local = BINARY[name]
    out = TENSOR_BINARY[name](a, b)
    np.testing.assert_allclose(out.numpy(), forward(a_np, b_np), rtol=1e-12)
    g = rng.standard_normal(out_shape)
    out.backward(g)
    da, db = (np.broadcast_to(d, out_shape) for d in local(a_np, b_np))
    assert a.grad.shape == a_shape and b.grad.shape == b_shape
    np.testing.assert_allclose(a.grad, sum_over_broadcast(g * da, a_shape), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.grad, sum_over_broadcast(g * db, b_shape), rtol=1e-10, atol=1e-12)


@st.composite
def reduction_args(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    ndim = len(shape)
    axes = [st.none(), hnp.valid_tuple_axes(ndim)]
    if ndim:
        axes.append(st.integers(-ndim, ndim - 1))
    return shape, draw(st.one_of(axes)), draw(st.booleans()), draw(st.sampled_from(["sum", "mean"]))


@PROPERTY_SETTINGS
@given(args=reduction_args(), seed=st.integers(0, 2**16))
def test_sum_and_mean_match_numpy_for_any_axes(args, seed):
    shape, axis, keepdims, name = args
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal(shape)
    x = Tensor(x_np, requires_grad=True)
    out = getattr(x, name)(axis=axis, keepdims=keepdims)
    expected = getattr(np, name)(x_np, axis=axis, keepdims=keepdims)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    # Every input element receives the gradient of the one output it was reduced into.
    kept_shape = np.sum(x_np, axis=axis, keepdims=True).shape
    count = x_np.size // int(np.prod(kept_shape))
    expected_grad = np.broadcast_to(g.reshape(kept_shape), shape) / (count if name == "mean" else 1)
    np.testing.assert_allclose(x.grad, expected_grad, rtol=1e-12)


@PROPERTY_SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_reshape_and_transpose_round_trip(shape, data):
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    x_np = np.random.default_rng(0).standard_normal(shape)
    x = Tensor(x_np, requires_grad=True)
    y = x.transpose(perm)
    np.testing.assert_array_equal(y.numpy(), np.transpose(x_np, perm))
    # Reshape the permuted data into the original shape and back, then undo the permutation.
    back = y.reshape(shape).reshape(y.shape).transpose(tuple(np.argsort(perm)))
    np.testing.assert_array_equal(back.numpy(), x_np)
    g = np.random.default_rng(1).standard_normal(shape)
    back.backward(g)
    np.testing.assert_array_equal(x.grad, g)


@PROPERTY_SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(signature="(m,n),(n,p)->(m,p)", max_dims=4, max_side=3),
       seed=st.integers(0, 2**16))
def test_matmul_batch_broadcasting_follows_numpy(shapes, seed):
    rng = np.random.default_rng(seed)
    a_np, b_np = (rng.standard_normal(s) for s in shapes.input_shapes)
    a, b = Tensor(a_np, requires_grad=True), Tensor(b_np, requires_grad=True)
    out = a @ b
    np.testing.assert_allclose(out.numpy(), a_np @ b_np, rtol=1e-12)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    # d<g, a b>/da = g b^T and d/db = a^T g, summed over the batch axes each operand was broadcast along.
    ga_full = g @ np.swapaxes(np.broadcast_to(b_np, out.shape[:-2] + b_np.shape[-2:]), -1, -2)
    gb_full = np.swapaxes(np.broadcast_to(a_np, out.shape[:-2] + a_np.shape[-2:]), -1, -2) @ g
    np.testing.assert_allclose(a.grad, sum_over_broadcast(ga_full, a_np.shape), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.grad, sum_over_broadcast(gb_full, b_np.shape), rtol=1e-10, atol=1e-12)
