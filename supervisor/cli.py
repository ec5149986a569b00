"""`python -m supervisor.cli`: the `overnight` command line (shared/cli.py) under its old name.

Service files written by `overnight install` start `<python> -m supervisor.cli run CONFIG
--run-dir DIR`; installed copies of them stay valid.
"""

import sys

from shared.cli import main

if __name__ == "__main__":
    sys.exit(main())
