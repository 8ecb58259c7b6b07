"""autograd/fast: every twin gives its plain kernel's numbers, and the switch switches.

Each twin in `autograd.fast.TWINS` is called beside the plain kernel it
replaces (`seam.plain_kernels()`), on the same inputs: float64 to 1e-10 (the
twins sum in other orders and chunks), float32 to float32 rounding. The
shapes are the UNet's (mnist-tiny and mnist at a small batch) plus odd ones
that reach the twins' special paths (1x1, stride 2, output-side, batch 1).
The files tests/test_fast_*.py test each twin's internals.
"""
import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import autograd
from autograd import fast, nn, seam
from autograd.fast import optim as fast_optim

PLAIN = seam.plain_kernels()
TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}


def arrays(*shapes, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def assert_same(twin_out, plain_out, dtype):
    if isinstance(plain_out, tuple):
        assert isinstance(twin_out, tuple) and len(twin_out) == len(plain_out)
        for a, b in zip(twin_out, plain_out):
            assert_same(a, b, dtype)
        return
    if plain_out is None:
        assert twin_out is None
        return
    assert twin_out.shape == plain_out.shape and twin_out.dtype == plain_out.dtype
    scale = max(1.0, float(np.abs(plain_out).max()))
    np.testing.assert_allclose(twin_out, plain_out, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def test_every_twin_replaces_a_swappable_kernel_and_the_switch_installs_them_all():
    assert set(fast.TWINS) <= set(PLAIN)
    was_on = fast.enabled()
    try:
        fast.disable()
        assert not fast.enabled() and seam.installed() == {}
        fast.enable()
        assert seam.installed() == fast.TWINS
    finally:
        (fast.enable if was_on else fast.disable)()


DTYPES = [np.float64, np.float32]

# (x shape, w shape, stride, padding)
CONVS = [
    ((2, 1, 28, 28), (32, 1, 3, 3), 1, 1),      # conv_in
    ((2, 32, 28, 28), (32, 32, 3, 3), 1, 1),    # ResBlock at 28x28
    ((2, 96, 28, 28), (32, 96, 3, 3), 1, 1),    # up path: C_in well above C_out (output side)
    ((2, 32, 28, 28), (32, 32, 3, 3), 2, 1),    # downsample
    ((2, 64, 7, 7), (64, 64, 3, 3), 1, 1),
    ((2, 128, 7, 7), (64, 128, 1, 1), 1, 0),    # skip 1x1
    ((2, 32, 28, 28), (1, 32, 3, 3), 1, 1),     # conv_out
    ((1, 3, 6, 5), (4, 3, 5, 5), 1, 2),
    ((3, 2, 9, 7), (2, 2, 3, 3), 3, 1),
    ((2, 3, 4, 5), (2, 3, 1, 1), 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONVS)
def test_conv2d_twins_equal_the_plain_convolution(x_shape, w_shape, stride, padding, dtype):
    x, w, b = arrays(x_shape, w_shape, (w_shape[0],), dtype=dtype)
    for bias in (b, None):
        assert_same(fast.TWINS["conv2d_forward"](x, w, bias, stride, padding),
                    PLAIN["conv2d_forward"](x, w, bias, stride, padding), dtype)
    y = PLAIN["conv2d_forward"](x, w, b, stride, padding)
    grad, = arrays(y.shape, dtype=dtype, seed=1)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        assert_same(fast.TWINS["conv2d_backward"](grad, x, w, stride, padding, *need),
                    PLAIN["conv2d_backward"](grad, x, w, stride, padding, *need), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, scale", [((2, 64, 7, 7), 2), ((2, 32, 14, 14), 2), ((1, 2, 3, 5), 3)])
def test_upsample_twins_equal_the_plain_upsampling(shape, scale, dtype):
    x, = arrays(shape, dtype=dtype)
    y = PLAIN["upsample_nearest2d_forward"](x, scale)
    assert_same(fast.TWINS["upsample_nearest2d_forward"](x, scale), y, dtype)
    grad, = arrays(y.shape, dtype=dtype, seed=1)
    assert_same(fast.TWINS["upsample_nearest2d_backward"](grad, scale),
                PLAIN["upsample_nearest2d_backward"](grad, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["group_norm", "group_norm_silu"])
@pytest.mark.parametrize("shape, groups", [((2, 32, 28, 28), 8), ((2, 64, 14, 14), 32), ((2, 128, 7, 7), 8),
                                           ((3, 6, 5), 3), ((1, 4, 3, 5), 1)])
def test_group_norm_twins_equal_the_plain_group_norm(name, shape, groups, dtype):
    # The twins save other things for the backward: each backward gets its own forward's.
    x, w, b = arrays(shape, (shape[1],), (shape[1],), dtype=dtype)
    y_twin, saved_twin = fast.TWINS[f"{name}_forward"](x, groups, w, b, 1e-5)
    y_plain, saved_plain = PLAIN[f"{name}_forward"](x, groups, w, b, 1e-5)
    assert_same(y_twin, y_plain, dtype)
    grad, = arrays(shape, dtype=dtype, seed=1)
    assert_same(fast.TWINS[f"{name}_backward"](grad, saved_twin),
                PLAIN[f"{name}_backward"](grad, saved_plain), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q, k, v", [((64, 49, 64), (64, 49, 64), (64, 49, 64)),     # 7x7 map, big batch
                                     ((2, 196, 32), (2, 196, 32), (2, 196, 32)),
                                     ((3, 4, 5), (3, 6, 5), (3, 6, 2))])
def test_attention_twins_equal_the_plain_attention(q, k, v, dtype):
    q, k, v = arrays(q, k, v, dtype=dtype)
    out_twin, p_twin = fast.TWINS["attention_forward"](q, k, v)
    out_plain, p_plain = PLAIN["attention_forward"](q, k, v)
    assert_same((out_twin, p_twin), (out_plain, p_plain), dtype)
    grad, = arrays(out_plain.shape, dtype=dtype, seed=1)
    assert_same(fast.TWINS["attention_backward"](grad, q, k, v, p_plain),
                PLAIN["attention_backward"](grad, q, k, v, p_plain), dtype)


def parameters(dtype, seed=0):
    shapes = [(4, 3, 3, 3), (4,), (5, 4), (5,)]
    params = [nn.Parameter(a) for a in arrays(*shapes, dtype=dtype, seed=seed)]
    for p, g in zip(params, arrays(*shapes, dtype=dtype, seed=seed + 1)):
        p.grad = g
    return params


@pytest.mark.parametrize("flat", [None, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_twins_equal_the_plain_loops(flat, dtype, monkeypatch):
    # flat=None: on a CPU the twins run the loops; True: the GPU's flat buffers, on NumPy.
    monkeypatch.setitem(fast_optim.FLAT, "mode", flat)
    results = []
    for update in (fast.TWINS, PLAIN):
        params = parameters(dtype)
        ms, vs = [p.data * 0 for p in params], [p.data * 0 for p in params]
        shadows = [p.data.copy() for p in params]
        norms = []
        for t in (1, 2, 3):
            norms.append(update["clip_grad_norm"](params, 1.0))
            update["adam_update"](params, ms, vs, 1e-2, (0.9, 0.99), 1e-8, 0.01, t)
            update["ema_update"](shadows, params, 0.9)
        results.append([norms, [p.data for p in params], ms, vs, shadows, [p.grad for p in params]])
    for twin, plain in zip(*results):
        for a, b in zip(twin, plain):
            assert_same(np.asarray(a), np.asarray(b), dtype)


def test_batch_parallel_twin_gives_the_unsplit_outputs_and_gradients(monkeypatch):
    monkeypatch.setenv("TINYDDPM_PROCESSES", "2")
    model = nn.Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(0), dtype=np.float64)
    x, = arrays((5, 2, 6, 6))
    runs = []
    for make in (fast.TWINS["batch_parallel"], PLAIN["batch_parallel"]):
        model.zero_grad()
        with make(model) as net:
            y = net(autograd.Tensor(x))
            (y * y).sum().backward()
        runs.append((y.data, [p.grad for p in model.parameters()]))
    (y_twin, g_twin), (y_plain, g_plain) = runs
    assert_same(y_twin, y_plain, np.float64)
    for a, b in zip(g_twin, g_plain):
        assert_same(a, b, np.float64)


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "AUTOGRAD_FAST"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_autograd_fast_in_the_environment_switches_the_twins(value, on):
    code = "import autograd; print(autograd.fast.enabled(), len(autograd.seam.installed()))"
    out = run_python(code, **({} if value is None else {"AUTOGRAD_FAST": value}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(on), str(len(fast.TWINS) if on else 0)]


def test_a_bad_autograd_fast_value_is_refused_in_one_line():
    out = run_python("import autograd", AUTOGRAD_FAST="yes")
    assert out.returncode != 0 and "AUTOGRAD_FAST must be 0 or 1, got 'yes'" in out.stderr


def fast_imports(path):
    """The lines of a module that import autograd.fast, in any spelling."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names = [base] + [f"{base}.{alias.name}" if node.module else base + alias.name
                              for alias in node.names]
        else:
            continue
        if any(n == "autograd.fast" or n.startswith("autograd.fast.") or n.lstrip(".").split(".")[0] == "fast"
               for n in names):
            found.append(node.lineno)
    return found


def test_the_plain_engine_never_imports_the_fast_layer():
    # Only autograd/__init__.py installs the fast layer; the rest of the core runs without it.
    root = pathlib.Path(autograd.__file__).parent
    core = [p for p in root.glob("*.py") if p.name != "__init__.py"] + list((root / "kernels").glob("*.py"))
    assert len(core) >= 10
    offenders = {str(p.relative_to(root)): fast_imports(p) for p in core if fast_imports(p)}
    assert not offenders, f"core modules importing autograd.fast (file: lines): {offenders}"
    assert fast_imports(root / "__init__.py"), "autograd/__init__.py should be what installs it"


@pytest.mark.parametrize("name", ["group_norm", "group_norm_silu"])
@pytest.mark.parametrize("forward_fast", [True, False])
def test_switching_the_fast_layer_between_forward_and_backward_is_harmless(name, forward_fast):
    # The twins save other things than the plain kernels: each backward must be its forward's.
    from autograd import Tensor, functional as F
    was_on = fast.enabled()
    grads = []
    try:
        for switch in (False, True):
            x = Tensor(arrays((2, 4, 3, 3))[0], requires_grad=True)
            (fast.enable if forward_fast else fast.disable)()
            y = getattr(F, name)(x, 2)
            if switch:
                (fast.disable if forward_fast else fast.enable)()
            y.backward(arrays(y.shape, seed=1)[0])
            grads.append(x.grad)
    finally:
        (fast.enable if was_on else fast.disable)()
    assert_same(grads[1], grads[0], np.float64)


def test_a_bad_autograd_fast_is_one_line_from_the_command_line():
    environment = dict(os.environ, AUTOGRAD_FAST="yes")
    for command in ([sys.executable, "-m", "tinyddpm", "info", "x.npz"],):
        out = subprocess.run(command, capture_output=True, text=True, env=environment)
        assert out.returncode == 2 and out.stderr == "tinyddpm: error: AUTOGRAD_FAST must be 0 or 1, got 'yes'\n"
