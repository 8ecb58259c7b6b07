"""Every test in tests/gpu/ runs the same computation on NumPy and on CuPy and
compares. Without CuPy or without a CUDA device they are skipped, with the
reason in pytest's summary (run `pytest -rs tests/gpu` to see it)."""
import pytest

from autograd import backend, fast, seam

REASON = backend.cuda_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if REASON is None:
        return
    skip = pytest.mark.skip(reason=f"GPU tests need CuPy and a CUDA device: {REASON}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture
def fast_layer(request):
    """autograd.fast enabled for the test ("fast", the default), or disabled ("plain",
    through indirect parametrization); the twins as before after it."""
    before = seam.installed()
    if getattr(request, "param", "fast") == "fast":
        fast.enable()
    else:
        fast.disable()
    yield getattr(request, "param", "fast")
    seam.uninstall()
    seam.install(before)
