"""`python -m worker COMMAND ...`: the worker's commands (train, checkpoints, import-gguf).

The supervisor starts each attempt as `<python> -m worker train CONFIG ...`
(supervisor/daemon/worker_command.py); `overnight train` is the same command.
"""

import sys

from shared.cli import WORKER_COMMANDS, main

sys.exit(main(commands=WORKER_COMMANDS))
