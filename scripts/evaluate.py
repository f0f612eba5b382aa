"""Evaluate a run or a model on the testbed: the same as `pyro-blora evaluate` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
