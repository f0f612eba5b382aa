"""Sequential adaptation to several domains: the same as `pyro-blora sequence` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["sequence", *sys.argv[1:]])
