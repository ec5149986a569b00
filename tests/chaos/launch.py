"""`python -m tests.chaos.launch SOFT_NOFILE PROGRAM ARGS...`: exec PROGRAM with the soft
open-file limit lowered to SOFT_NOFILE (the hard limit unchanged).

Every supervisor of the campaign starts this way with 256, macOS's default soft limit
(issue 12: "300 idle control connections at a soft file-descriptor limit of 256 abort the
supervisor"). A launcher rather than `preexec_fn`, which is unsafe when the campaign runs
several runs in threads (`--jobs`).
"""

from __future__ import annotations

import os
import resource
import sys


def main(argv: list[str]) -> None:
    soft = int(argv[0])
    _old, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
