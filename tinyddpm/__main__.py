"""`python -m tinyddpm ...`: the same command line as the `tinyddpm` console script."""
import os
import sys


def main():
    """The console script's entry: checks the switch `import autograd` reads, in one line,
    before anything imports it (a bad value would otherwise end in a traceback)."""
    value = os.environ.get("AUTOGRAD_FAST", "1").strip()
    if value not in ("0", "1"):
        print(f"tinyddpm: error: AUTOGRAD_FAST must be 0 or 1, got {value!r}", file=sys.stderr)
        return 2
    from tinyddpm.cli import main as run
    return run()


if __name__ == "__main__":
    sys.exit(main())
