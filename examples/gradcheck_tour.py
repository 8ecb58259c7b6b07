"""How a gradient check proves (or disproves) an op's backward.

Every op in `autograd` has a hand-written backward. This script takes one op,
computes its gradient two ways and prints them side by side:

- analytic: run the op forward, then `backward()` with a random output
  gradient u, so each input receives d<u, f(x)>/dx from the op's backward;
- numeric: nudge one input element by +eps and by -eps, run only the forward,
  and take the slope (L(x + eps) - L(x - eps)) / (2 eps) of L = <u, f(x)>.

Central differences in float64 agree with a correct backward to ~1e-9. Then
`autograd.gradcheck` does the same over every element. With `--break` the
op's backward is sabotaged on purpose (one element of one input's gradient
scaled by 1.01, a 1% error) and gradcheck is shown catching it.

The check runs on the plain kernels, the code the line "backward:" names;
`--twins` checks the fast layer's twins of them instead (autograd/fast/).

    python examples/gradcheck_tour.py                  # conv2d
    python examples/gradcheck_tour.py --op attention
    python examples/gradcheck_tour.py --op silu --break
    python examples/gradcheck_tour.py --op group_norm --twins
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runs from a checkout, installed or not
import autograd  # noqa: E402
import autograd.functional as F  # noqa: E402
from autograd import Tensor, no_grad  # noqa: E402


# =============================================================================
# The ops on show: inputs, how to call them, and the Function class behind them
# =============================================================================

def _op_table(quick):
    # Small shapes: the element-by-element check runs two forwards per input value.
    s = 3 if quick else 5
    return {
        "conv2d": dict(
            shapes={"x": (2, 3, s, s), "w": (4, 3, 3, 3), "b": (4,)},
            fn=lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=1),
            function="Conv2d", where="autograd/kernels/conv.py::conv2d_backward"),
        "group_norm": dict(
            shapes={"x": (2, 4, s, s), "weight": (4,), "bias": (4,)},
            fn=lambda x, weight, bias: F.group_norm(x, 2, weight, bias),
            function="GroupNorm", where="autograd/kernels/norm.py::group_norm_backward"),
        "attention": dict(
            shapes={"q": (2, s, 4), "k": (2, s + 1, 4), "v": (2, s + 1, 3)},
            fn=lambda q, k, v: F.attention(q, k, v),
            function="Attention", where="autograd/kernels/attention.py::attention_backward"),
        "silu": dict(
            shapes={"x": (3, s)},
            fn=lambda x: F.silu(x),
            function="SiLU", where="autograd/functional.py::SiLU.backward"),
        "linear": dict(
            shapes={"x": (3, 4), "w": (s, 4), "b": (s,)},
            fn=lambda x, w, b: F.linear(x, w, b),
            function="Linear", where="autograd/functional.py::Linear.backward"),
    }


OPS = tuple(_op_table(quick=False))


# =============================================================================
# Gradients two ways
# =============================================================================

def analytic_gradients(fn, inputs, u):
    """d<u, fn(inputs)>/d(input) for every input, from the op's backward."""
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(u)
    return [x.grad.copy() for x in inputs]


def numeric_gradients(fn, inputs, u, eps=1e-6):
    """The same by central differences: two forward passes per input element."""
    def loss():
        with no_grad():
            return float((fn(*inputs).data * u).sum())

    grads = []
    for x in inputs:
        g = np.zeros(x.shape)
        flat = x.data.reshape(-1)            # a view: changing it changes x
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            plus = loss()
            flat[i] = orig - eps
            minus = loss()
            flat[i] = orig
            g.reshape(-1)[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


@contextlib.contextmanager
def broken_backward(function_name, input_index, flat_index, factor=1.01):
    """Temporarily scale one element of one input's gradient in a Function's backward.

    The lowercase functions look their Function class up in `autograd.functional`
    each time they are called, so swapping the class there reaches every call.
    """
    original = getattr(F, function_name)

    class Broken(original):
        def backward(self, grad):
            grads = super().backward(grad)
            grads = list(grads) if isinstance(grads, tuple) else [grads]   # one input: one array
            g = grads[input_index].copy()
            g.reshape(-1)[flat_index] *= factor
            grads[input_index] = g
            return tuple(grads) if len(grads) > 1 else grads[0]

    setattr(F, function_name, Broken)
    try:
        yield
    finally:
        setattr(F, function_name, original)


# =============================================================================
# The tour
# =============================================================================

def _index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(flat_index, shape))


@contextlib.contextmanager
def kernels(twins):
    """The plain kernels (twins=False) or the fast layer's twins, for the block's duration."""
    was_on = autograd.fast.enabled()
    (autograd.fast.enable if twins else autograd.fast.disable)()
    try:
        yield
    finally:
        (autograd.fast.enable if was_on else autograd.fast.disable)()


def run(op="conv2d", break_it=False, quick=False, seed=0, rows=6, out=sys.stdout, twins=False):
    """Print the comparison; return True when the outcome is the expected one
    (gradcheck passes a correct backward, and catches a broken one)."""
    with kernels(twins):
        return _run(op, break_it, quick, seed, rows, out, twins)


def _run(op, break_it, quick, seed, rows, out, twins):
    spec = _op_table(quick)[op]
    rng = np.random.default_rng(seed + 1)
    names = list(spec["shapes"])
    inputs = [Tensor(rng.standard_normal(shape), requires_grad=True)    # float64
              for shape in spec["shapes"].values()]
    fn = spec["fn"]
    with no_grad():
        out_shape = fn(*inputs).shape
    # A random output gradient, not all ones (which would hide some mistakes),
    # drawn as gradcheck(seed=seed) draws its own so the numbers below match its report.
    u = np.random.default_rng(seed).standard_normal(out_shape)

    def say(line=""):
        print(line, file=out)

    where = spec["where"] if not twins or "kernels/" not in spec["where"] else \
        "the fast layer's twin of " + spec["where"].split("::")[1] + " (autograd/fast/)"
    say(f"op: {op}   backward: {where}")
    say("inputs: " + ", ".join(f"{n} {tuple(s)}" for n, s in spec["shapes"].items())
        + f"   output: {tuple(out_shape)}   dtype float64")

    numeric = numeric_gradients(fn, inputs, u)
    analytic = analytic_gradients(fn, inputs, u)
    # The element to break: the largest gradient of the first input, so a 1% error is visible.
    target = int(np.argmax(np.abs(analytic[0])))
    context = broken_backward(spec["function"], 0, target) if break_it else contextlib.nullcontext()
    with context:
        analytic = analytic_gradients(fn, inputs, u)
        if break_it:
            say(f"\n--break: the backward of {spec['function']} now scales "
                f"d{names[0]}{_index(target, inputs[0].shape)} by 1.01")

        say(f"\n{'input':>6} {'index':>16} {'analytic':>16} {'numeric':>16} {'|diff|':>10}")
        shown = sorted(set(rng.choice(inputs[0].size, size=min(rows - 1, inputs[0].size),
                                      replace=False).tolist()) | {target})
        for i in shown:
            idx = _index(i, inputs[0].shape)
            a, n = analytic[0][idx], numeric[0][idx]
            say(f"{names[0]:>6} {str(idx):>16} {a:16.10f} {n:16.10f} {abs(a - n):10.2e}")
        for name, a, n in zip(names, analytic, numeric):
            worst = _index(np.argmax(np.abs(a - n)), a.shape)
            say(f"worst |analytic - numeric| over d{name}: {abs(a[worst] - n[worst]):.2e} at {worst}")

        say("\nautograd.gradcheck(fn, inputs):")
        try:
            autograd.gradcheck(fn, inputs, seed=seed)
            say("  passed: backward agrees with finite differences at every element "
                "and in a random direction")
            caught = False
        except autograd.GradcheckError as err:
            say(f"  FAILED, as it should: {err}" if break_it else f"  FAILED: {err}")
            caught = True
    if break_it and not caught:
        say("  the broken backward was NOT caught: the check is too weak")
    return caught == break_it


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=OPS, default="conv2d")
    parser.add_argument("--break", dest="break_it", action="store_true",
                        help="scale one gradient element by 1.01 and watch gradcheck catch it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--twins", action="store_true",
                        help="check the fast layer's twins of the kernels instead of the plain kernels")
    args = parser.parse_args(argv)
    ok = run(args.op, args.break_it, args.quick, args.seed, twins=args.twins)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
