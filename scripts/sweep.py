"""The same as `pyro-blora sweep` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["sweep", *sys.argv[1:]])
