"""`python -m supervisor.daemon CONFIG [--run-dir DIR]`: the run command on its own."""

import sys

from supervisor.daemon.main import _standalone

sys.exit(_standalone())
