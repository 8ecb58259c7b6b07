"""`python -m tinyddpm ...`: the same command line as the `tinyddpm` console script."""
import sys

from tinyddpm.cli import main

sys.exit(main())
