"""The open-file limit mlx_lm needs, checked before anything starts.

mlx_lm sets the limit when it is imported (mlx_lm/utils.py, "for large models with lots of
files"): `resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 4096))`. With a hard limit below
4096, a process without the privilege to raise it fails right there, inside the import,
with `ValueError: not allowed to raise maximum limit` — every worker at start, the same way,
so restarting is pointless. `problem()` finds that first (raising the hard limit when this
process may); the supervisor refuses to start with that one line (exit 78, before the run is
touched) and the worker exits SYSTEM_LIMIT (71) with it, which the supervisor gives up on at
once (shared/exitcodes.py).
"""

from __future__ import annotations

import resource

# mlx_lm/utils.py: resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 4096))
MLX_LM_HARD_LIMIT = 4096


def problem(needed: int = MLX_LM_HARD_LIMIT) -> str | None:
    """Why mlx_lm cannot be imported under this process's open-file limit (None: it can).

    A hard limit below `needed` is raised to it when the process is allowed to (root,
    CAP_SYS_RESOURCE); otherwise the reason is returned as one line naming the limit and
    how to raise it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, needed), needed))
    except (ValueError, OSError):
        return (
            f"the hard open-file limit is {hard} (ulimit -Hn), below the {needed} mlx_lm "
            f"sets when it is imported: every worker would fail at start. Raise it where the "
            f"run is started: `ulimit -Hn {needed}` in the shell, LimitNOFILE={needed} in a "
            f"systemd unit, HardResourceLimits/NumberOfFiles in a launchd plist"
        )
    return None
