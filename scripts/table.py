"""The same as `pyro-blora table` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["table", *sys.argv[1:]])
