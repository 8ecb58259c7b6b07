"""Helpers for the tests of readers of outside bytes: how much memory a read takes."""
import tracemalloc


def peak_bytes(read, *args, refusal=Exception):
    """The peak of Python and NumPy allocations while read(*args) runs (tracemalloc sees both).

    `refusal`, the reader's own error, is expected and swallowed; any other exception propagates.
    """
    tracemalloc.start()
    try:
        read(*args)
    except refusal:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak
