"""Train one method into a run folder: the same as `pyro-blora train` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
