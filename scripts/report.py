"""The same as `pyro-blora report` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["report", *sys.argv[1:]])
