"""The main job: the same as `pyro-blora main` (see --help)."""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["main", *sys.argv[1:]])
