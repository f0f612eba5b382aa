"""Build the offline code-switching testbed: the same as `pyro-blora testbed` (see --help).

Examples:
  python scripts/build_testbed.py --out testbed
  python scripts/build_testbed.py --out tiny --small
  python scripts/build_testbed.py --out mine --text-file lines.txt --pair es-en
"""

import sys

from pyro_blora.cli import app

if __name__ == "__main__":
    app(["testbed", *sys.argv[1:]])
