"""The same as `pyro-blora inspect` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["inspect", *sys.argv[1:]])
