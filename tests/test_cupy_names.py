"""Static checks that ``autograd/`` stays runnable on CuPy.

Kernels get their array module as a variable named ``xp`` (``numpy`` or
``cupy``).  Every ``xp.<chain>`` they use must exist in CuPy too, so each
chain found under ``autograd/`` is looked up in ``tests/cupy_names.txt``, the
committed list of CuPy's names made by ``tools/dump_cupy_names.py``.  No GPU,
CuPy or NumPy is needed: the sources are only parsed with ``ast``.

A chain passes if it is in the list, or if the longest listed prefix of it is
a leaf the list does not expand (``xp.float32.__name__``: ``float32`` is a
NumPy type CuPy re-exports, and its attributes are not listed).  Below the
root, below a module and below a class the list does expand, a missing name
is an error.

If a chain is flagged but CuPy does have it, regenerate the list with
``tools/dump_cupy_names.py`` (see its docstring) rather than editing it by
hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES_FILE = ROOT / "tests" / "cupy_names.txt"
AUTOGRAD = ROOT / "autograd"
TINYDDPM = ROOT / "tinyddpm"
BACKEND = AUTOGRAD / "backend.py"

XP = "xp"
CUPY_PACKAGES = ("cupy", "cupyx", "cupy_backends")


# --------------------------------------------------------------------------
# the list
# --------------------------------------------------------------------------

def load_names(path: Path = NAMES_FILE) -> tuple[str, frozenset[str]]:
    """Return (header comment lines joined, set of names) of the list."""
    header, names = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            header.append(line)
        else:
            names.add(line)
    return "\n".join(header), frozenset(names)


def containers_of(names: frozenset[str]) -> frozenset[str]:
    """Names the list expands: every proper prefix of a listed name."""
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            out.add(".".join(parts[:i]))
    return frozenset(out)


def is_known(chain: str, names: frozenset[str],
             containers: frozenset[str]) -> bool:
    if chain in names:
        return True
    parts = chain.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in names:
            # Below an expanded module or class every name is listed, so a
            # missing one is missing; below a leaf the list says nothing.
            return prefix not in containers
    return False  # not even the first name is a CuPy attribute


# --------------------------------------------------------------------------
# the scanners
# --------------------------------------------------------------------------

def xp_chains(source: str, filename: str = "<string>") -> list[tuple[str, int]]:
    """Every ``xp.a.b.c`` in source as ("a.b.c", line), longest chains only.

    Chains used as calls (``xp.matmul(a, b)``), as plain attributes
    (``dtype=xp.float32``) and as call targets whose result is used further
    (``xp.random.default_rng(0).standard_normal``: the chain stops at the
    call, giving ``random.default_rng``) are all found, as are
    ``getattr(xp, "name")`` calls with a constant name and no default.
    """
    tree = ast.parse(source, filename=filename)
    inner = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = []
            cur = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == XP:
                found.append((".".join(reversed(parts)), node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) == 2
            and not node.keywords
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == XP
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            found.append((node.args[1].value, node.lineno))
    return sorted(found, key=lambda item: (item[1], item[0]))


def unknown_chains(source: str, names: frozenset[str],
                   filename: str = "<string>") -> list[tuple[str, int]]:
    containers = containers_of(names)
    return [
        (chain, line)
        for chain, line in xp_chains(source, filename)
        if not is_known(chain, names, containers)
    ]


def _is_cupy_module_name(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in CUPY_PACKAGES


def cupy_imports(source: str, filename: str = "<string>") -> list[tuple[str, int]]:
    """Every import of cupy/cupyx/cupy_backends as (module, line).

    Covers ``import cupy``, ``import cupy.linalg as cl``, ``from cupy import
    x``, ``from cupyx.scipy import y`` and ``importlib.import_module("cupy")``
    / ``__import__("cupy")`` with a constant name.
    """
    tree = ast.parse(source, filename=filename)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names
                      if _is_cupy_module_name(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_cupy_module_name(node.module):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = (func.id if isinstance(func, ast.Name)
                     else func.attr if isinstance(func, ast.Attribute)
                     else None)
            arg = node.args[0]
            if (fname in ("import_module", "__import__")
                    and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and _is_cupy_module_name(arg.value)):
                found.append((arg.value, node.lineno))
    return found


def py_files(*dirs: Path) -> list[Path]:
    files = []
    for d in dirs:
        if d.is_dir():
            files += [p for p in d.rglob("*.py") if p.is_file()]
    return sorted(files)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

NAMES_HEADER, NAMES = load_names()


def test_name_list_is_cupy_14():
    first = NAMES_HEADER.splitlines()[0]
    assert first.startswith("# cupy 14."), first
    # Spot checks: names kernels use, and NumPy-only names CuPy lacks.
    for name in ("matmul", "float32", "einsum", "lib.stride_tricks.as_strided",
                 "lib.stride_tricks.sliding_window_view", "random.default_rng",
                 "random.Generator.standard_normal", "linalg.norm",
                 "fft.rfft", "ndarray.astype"):
        assert name in NAMES, name
    for name in ("ndenumerate", "busday_count", "lib.npyio", "testing"):
        assert name not in NAMES, name
    assert len(NAMES) > 500


def test_name_list_is_sorted_and_unique():
    body = [line for line in NAMES_FILE.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")]
    assert body == sorted(set(body))


def test_autograd_xp_chains_exist_in_cupy():
    offenders = []
    for path in py_files(AUTOGRAD):
        source = path.read_text(encoding="utf-8")
        for chain, line in unknown_chains(source, NAMES, str(path)):
            offenders.append(f"{_rel(path)}:{line}: xp.{chain}")
    assert not offenders, (
        "array-module names that CuPy 14 lacks (NumPy-only?); "
        "see tests/cupy_names.txt:\n  " + "\n  ".join(offenders)
    )


def test_checker_flags_exactly_the_numpy_only_name():
    source = (
        "def kernel(xp, a):\n"
        "    v = xp.lib.stride_tricks.as_strided(a, (2, 2), (8, 8))\n"
        "    for idx, x in xp.ndenumerate(a):\n"
        "        pass\n"
    )
    # Verify the premise against the committed list itself.
    assert "lib.stride_tricks.as_strided" in NAMES
    assert "ndenumerate" not in NAMES
    assert xp_chains(source) == [("lib.stride_tricks.as_strided", 2),
                                 ("ndenumerate", 3)]
    assert unknown_chains(source, NAMES) == [("ndenumerate", 3)]


def test_checker_handles_calls_attributes_and_nesting():
    source = "\n".join([
        "import numpy as np",
        "def kernel(xp, a, b):",
        "    c = xp.matmul(a, b).astype(xp.float32)",            # 3: ok, ok
        "    r = xp.random.default_rng(0).standard_normal((2,))",  # 4: ok
        "    n = xp.linalg.norm(c)",                             # 5: ok
        "    s = xp.float32.__name__",                           # 6: leaf, ok
        "    g = xp.random.Generator.normal",                    # 7: missing
        "    d = xp.busday_count",                               # 8: missing
        "    m = xp.linalg.vector_norm(c)",                      # 9: missing
        "    k = getattr(xp, 'ndenumerate')",                    # 10: missing
        "    p = getattr(xp, 'ndenumerate', None)",              # 11: probe
        "    q = np.ndenumerate(a)",                             # 12: not xp
        "    w = xp",                                            # 13: no chain
        "    return c, r, n, s, g, d, m, k, p, q, w",
    ])
    assert [c for c, _ in xp_chains(source)] == [
        "float32", "matmul", "random.default_rng", "linalg.norm",
        "float32.__name__",
        "random.Generator.normal", "busday_count", "linalg.vector_norm",
        "ndenumerate",
    ]
    assert unknown_chains(source, NAMES) == [
        ("random.Generator.normal", 7),
        ("busday_count", 8),
        ("linalg.vector_norm", 9),
        ("ndenumerate", 10),
    ]


def test_autograd_files_are_scanned():
    files = py_files(AUTOGRAD)
    names = {path.relative_to(AUTOGRAD).as_posix() for path in files}
    # The scan must reach the core, its kernels and the fast layer's CUDA code.
    assert {"tensor.py", "kernels/conv.py", "fast/conv_gpu.py", "fast/cuda.py"} <= names, sorted(names)
    for path in files:  # every file must parse, or the scan above is blind
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_import_checker_finds_every_form():
    source = "\n".join([
        "import os, cupy",
        "import cupy.linalg as cl",
        "from cupyx.scipy import special",
        "from cupy_backends.cuda.api import runtime",
        "import importlib",
        "m = importlib.import_module('cupy')",
        "n = __import__('cupyx')",
        "import numpy, cupyfake",
        "from . import cupy_helpers",
    ])
    assert cupy_imports(source) == [
        ("cupy", 1), ("cupy.linalg", 2), ("cupyx.scipy", 3),
        ("cupy_backends.cuda.api", 4), ("cupy", 6), ("cupyx", 7),
    ]


def test_cupy_is_imported_only_in_backend():
    files = py_files(AUTOGRAD, TINYDDPM)
    assert BACKEND in files and len(files) >= 20
    offenders = []
    for path in files:
        if path == BACKEND:
            continue
        for module, line in cupy_imports(path.read_text(encoding="utf-8"),
                                         str(path)):
            offenders.append(f"{_rel(path)}:{line}: imports {module}")
    assert not offenders, (
        "cupy may be imported only in autograd/backend.py; kernels take the "
        "array module as xp:\n  " + "\n  ".join(offenders)
    )
