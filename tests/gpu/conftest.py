"""Every test in tests/gpu/ runs the same computation on NumPy and on CuPy and
compares. Without CuPy or without a CUDA device they are skipped, with the
reason in pytest's summary (run `pytest -rs tests/gpu` to see it)."""
import pytest

from autograd import backend

REASON = backend.cuda_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if REASON is None:
        return
    skip = pytest.mark.skip(reason=f"GPU tests need CuPy and a CUDA device: {REASON}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
