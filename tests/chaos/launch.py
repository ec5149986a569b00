"""`python -m tests.chaos.launch SOFT_NOFILE PROGRAM ARGS...`: exec PROGRAM with the soft
open-file limit lowered to SOFT_NOFILE (the hard limit unchanged).

Every supervisor of the campaign starts this way with 256, macOS's default soft limit
(issue 12: "300 idle control connections at a soft file-descriptor limit of 256 abort the
supervisor"). A launcher rather than `preexec_fn`, which is unsafe when the campaign runs
several runs in threads (`--jobs`). It also clears the signal mask the campaign's command
line sets (tests/chaos/__main__.py): the supervisor must hear SIGTERM.
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def main(argv: list[str]) -> None:
    soft = int(argv[0])
    _old, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # the campaign blocks its stop signals (tests/chaos/__main__.py): not the supervisor
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
