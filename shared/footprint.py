"""A process's physical footprint on macOS: the memory the system charges it, Metal's included.

Memory that Metal holds for a process (IOAccelerator / IOGPU allocations) is invisible to
RSS and to `mx.get_peak_memory()`: public MLX reports show a process footprint of 110 GB
while the peak said 46 GB (ml-explore/mlx#3896), or 51 GB against 7 GB. macOS's own measure
is the *physical footprint* — what Activity Monitor's "Memory" column and `footprint <pid>`
show, and what jetsam kills by. It is `ri_phys_footprint` of `proc_pid_rusage(pid,
RUSAGE_INFO_V2, &info)` (libproc.h / sys/resource.h, macOS 10.9+), read here with ctypes: no
dependency. A process may read its own and its children's (same user) without privileges.

`phys_footprint_mb(pid)` is None off macOS or when the call fails (the process is gone).

struct rusage_info_v2 (sys/resource.h), in order:
    uint8_t  ri_uuid[16];
    uint64_t ri_user_time, ri_system_time, ri_pkg_idle_wkups, ri_interrupt_wkups,
             ri_pageins, ri_wired_size, ri_resident_size, ri_phys_footprint,
             ri_proc_start_abstime, ri_proc_exit_abstime, ri_child_user_time,
             ri_child_system_time, ri_child_pkg_idle_wkups, ri_child_interrupt_wkups,
             ri_child_pageins, ri_child_elapsed_abstime, ri_diskio_bytesread,
             ri_diskio_byteswritten;
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache
from typing import Any

RUSAGE_INFO_V2 = 2
MB = 2**20
SYSTEM: str = sys.platform  # a variable: mypy would call the macOS branch unreachable


class RusageInfoV2(ctypes.Structure):
    """struct rusage_info_v2 (sys/resource.h; module docstring)."""

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [
        (name, ctypes.c_uint64) for name in (
            "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups",
            "ri_pageins", "ri_wired_size", "ri_resident_size", "ri_phys_footprint",
            "ri_proc_start_abstime", "ri_proc_exit_abstime", "ri_child_user_time",
            "ri_child_system_time", "ri_child_pkg_idle_wkups", "ri_child_interrupt_wkups",
            "ri_child_pageins", "ri_child_elapsed_abstime", "ri_diskio_bytesread",
            "ri_diskio_byteswritten")]


@lru_cache(maxsize=1)
def _libproc() -> Any:
    if SYSTEM != "darwin":
        return None
    path = ctypes.util.find_library("proc") or "/usr/lib/libSystem.B.dylib"
    try:
        lib = ctypes.CDLL(path, use_errno=True)
        fn = lib.proc_pid_rusage
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(RusageInfoV2)]
    fn.restype = ctypes.c_int
    return fn


def phys_footprint_mb(pid: int) -> float | None:
    """The physical footprint of process `pid` in MB (macOS), None elsewhere or on failure."""
    fn = _libproc()
    if fn is None:
        return None
    info = RusageInfoV2()
    if fn(pid, RUSAGE_INFO_V2, ctypes.byref(info)) != 0:
        return None
    return float(info.ri_phys_footprint) / MB
