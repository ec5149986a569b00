"""The config's `distributed:` section: a data-parallel group on MLX's own distributed engine.

    distributed:
      processes: 2            # ranks (world size); 1 = one process, no group (the default)
      hosts: [mac-a, mac-b]   # optional: one host per rank (ssh names); empty = all local
      backend: ring           # ring (TCP over Ethernet or the Thunderbolt bridge) or jaccl
      rdma: []                # jaccl: rank i's RDMA device to rank j ("" to itself)
      port_base: 0            # 0 = free ports picked per attempt (localhost); else a range
      python: ""              # the Python on remote hosts (default: the same path as here)

What the keys mean and where they come from: mlx's own launcher (`mlx.launch`,
mlx/distributed_run.py, 0.32.4) starts `-n N` local ranks or one rank per host of a
hostfile, and tells each rank `MLX_RANK` and `MLX_HOSTFILE` (a JSON list, one list of
"ip:port" per rank) for ring, or `MLX_IBV_DEVICES`/`MLX_JACCL_COORDINATOR` for jaccl. The
supervisor starts the ranks itself (supervisor/daemon/group.py says why), so these keys
replace the launcher's flags.

`batch_size` stays the global micro-batch, as in `mlx_lm lora` under `mlx.launch`
(mlx_lm/tuner/trainer.py `iterate_batches`: "The batch size must be divisible by the number
of workers"); each rank takes every `processes`-th example of each effective batch
(worker/distributed.py), so the effective batch and its math are those of one process.

Not part of the config hash (shared/config_identity.py): a group trains exactly what one
process with the same global batch trains, so a run may move between one Mac and several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.errors import ConfigError

BACKENDS = ("ring", "jaccl")
MAX_PROCESSES = 64  # more ranks than this on one config is a typo, not a cluster
_HOST = re.compile(r"(?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_.:-]+")  # [user@]host, ssh's syntax
# A rank's CURVE keys when telemetry crosses the network (supervisor/daemon/curve.py): the
# supervisor's public key, the rank's public and secret key, z85; environment only.
CURVE_SERVER_ENV = "OVERNIGHT_CURVE_SERVER"
CURVE_PUBLIC_ENV = "OVERNIGHT_CURVE_PUBLIC"
CURVE_SECRET_ENV = "OVERNIGHT_CURVE_SECRET"
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DistributedOptions:
    processes: int = _f(1, "ranks of the data-parallel group (world size); 1 = no group")
    hosts: list[str] = field(default_factory=list, metadata={
        "help": "one ssh host per rank (empty: every rank on this machine)"})
    backend: Literal["ring", "jaccl"] = _f("ring", "mx.distributed backend: ring or jaccl")
    port_base: int = _f(0, "first TCP port of the ranks (0: free ports, fresh per attempt)")
    python: str = _f("", "the Python on remote hosts (default: this one's path)")
    rdma: list[list[str]] = field(default_factory=list, metadata={
        "help": "jaccl: per rank, the RDMA device to each rank (\"\" to itself), as "
                "mlx.launch's hostfile"})

    @property
    def enabled(self) -> bool:
        return self.processes > 1

    @property
    def remote(self) -> bool:
        """Whether any rank runs on another machine (then telemetry crosses the network)."""
        return any(h.split("@")[-1] not in LOCAL_HOSTS for h in self.hosts)

    def host(self, rank: int) -> str:
        """The ssh host of `rank` ("" = this machine)."""
        return self.hosts[rank] if self.hosts else ""


def check(d: DistributedOptions, batch_size: int, source: str) -> None:
    """ConfigError (one line, exit 78) for a group that cannot work: a world size below 1
    or above MAX_PROCESSES, hosts that are not one per rank, a malformed host, a global
    `batch_size` that the world size does not divide (mlx_lm's rule; 0 = not checked),
    jaccl without hosts or without a full `rdma` matrix, a port range outside 1024..65535."""
    def bad(key: str, what: str, got: Any) -> ConfigError:
        return ConfigError(f"{source}: distributed.{key}: expected {what}, got {got!r}")

    if not 1 <= d.processes <= MAX_PROCESSES:
        raise bad("processes", f"an integer 1..{MAX_PROCESSES}", d.processes)
    if d.hosts and len(d.hosts) != d.processes:
        raise bad("hosts", f"one host per rank ({d.processes} for processes: {d.processes})",
                  d.hosts)
    for host in d.hosts:
        if not _HOST.fullmatch(host) or host.startswith("-"):
            raise bad("hosts", "ssh host names like mac-a or user@10.0.0.2", host)
    if d.enabled and batch_size and batch_size % d.processes:
        raise ConfigError(
            f"{source}: batch_size: expected a multiple of distributed.processes "
            f"({d.processes}): each rank takes batch_size / processes examples of every "
            f"micro-batch, as mlx_lm under mlx.launch; got {batch_size!r}")
    if d.backend == "jaccl" and d.enabled:
        if not d.remote:
            raise bad("backend", "ring on one machine (jaccl is Thunderbolt RDMA between "
                      "Macs: give hosts)", d.backend)
        n = d.processes
        if len(d.rdma) != n or any(len(row) != n for row in d.rdma) \
                or any(bool(d.rdma[i][j]) == (i == j) for i in range(n) for j in range(n)):
            raise bad("rdma", f"for jaccl, {n} rows of {n} RDMA device names (rank i's "
                      "device to rank j; \"\" to itself), as mlx.launch's hostfile "
                      "\"rdma\"", d.rdma)
    if d.port_base and not 1024 <= d.port_base <= 65535 - 2 * d.processes:
        raise bad("port_base", f"0 or a port 1024..{65535 - 2 * d.processes}", d.port_base)
