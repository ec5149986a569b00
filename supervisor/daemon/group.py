"""A data-parallel group's ranks, started, watched and ended as one worker.

Why the supervisor starts the ranks itself and not through `mlx.launch` (measured with mlx
0.32.4, ring backend, on localhost; issue 14): the launcher exits 0 whatever its ranks do
(SIGKILL, exit 127, a JSON error), SIGTERM to it orphans the ranks, it never notices a
frozen rank, and `-n 1` crashes the rank. What it does for a rank is small — `MLX_RANK`,
`MLX_HOSTFILE` (a JSON list, one list of "ip:port" per rank) and, on another host, the same
command through ssh — so `GroupSpawner` does that, per attempt:

- **Fresh ports.** A rank of a previous attempt still listening captured the next
  attempt's connection (SO_REUSEPORT), so every attempt gets ports no earlier attempt of
  this supervisor used (`fresh_ports`: free ones the kernel hands out on 127.0.0.1, or the
  next block after `distributed.port_base`), in a new hostfile (`RUN_DIR/group/`, 0600).
- **Every old rank dead first.** The next attempt starts only after `GroupProcess.poll()`
  has reaped every rank of the last one; `spawn` checks again and kills what is left.
- **Each rank like a worker.** Own session, parent-death signal and its own orphan guard
  (supervisor/daemon/spawn.py): no rank outlives the supervisor. Rank 0's output is the
  attempt's log (`logs/worker-N.log`), rank r's `logs/worker-N-rank-r.log`. A remote rank
  is `ssh -tt host 'script'` as mlx.launch builds it (supervisor/daemon/group_remote.py).

`GroupProcess` is the supervisor's one WorkerProcess for the whole group:

- **Any rank's end ends the group.** A rank that ends with anything but a normal end (0
  completed, 20 early-stopped, 23 stopped on request) makes the others get SIGCONT +
  SIGTERM at once, SIGKILL after the grace (`supervisor.stop_timeout`, at most 10 s). Ranks
  ending normally wait for rank 0 (its test pass and COMPLETE come after theirs); once rank
  0 has ended normally the others get the grace to end alike. `poll()` returns a code only
  when every rank has been reaped.
- **The culprit.** The first rank to end abnormally, passing over ranks that only lost a
  peer (`[ring] connection to a peer was lost` in their output: collateral, ~20 ms after a
  rank dies); or the rank the watch named (supervisor/daemon/group_watch.py: it stopped
  beating or lags). The group's return code is the culprit's (rank 0's when none failed),
  its output is read for the classification, and the record names it (`failed_rank`,
  `ranks`: shared/run_record.py).
- **Signals go to the culprit first**, then to every other rank (`signal`), so stopping a
  hung group is: the culprit, then SIGTERM + SIGCONT to all, SIGKILL after the grace
  (supervisor/daemon/stopping.py drives it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.distributed_config import DistributedOptions
from shared.run_record import RankRecord
from shared.tail import tail_lines
from supervisor.daemon.group_remote import check_hosts as check_hosts
from supervisor.daemon.group_remote import remote_argv, resolve_ip, secrets_env
from supervisor.daemon.spawn import ORPHAN_GRACE, PopenSpawner, WorkerProcess

NORMAL_ENDS = frozenset({0, 20, 23})  # completed, early-stopped, stopped on request
PEER_LOST = b"connection to a peer was lost"  # mlx's ring backend, mlx >= 0.32.1
OUTPUT_TAIL_BYTES = 4096
WORLD_ENV = "OVERNIGHT_WORLD_SIZE"


def fresh_ports(n: int, used: set[int], port_base: int = 0) -> list[int]:
    """`n` TCP ports no earlier attempt used: free ports the kernel hands out on 127.0.0.1
    (port_base 0), or the first free block of `n` at or after `port_base` (remote hosts:
    ports we cannot probe; both ends must allow them through their firewalls)."""
    ports: list[int] = []
    if port_base:
        port = port_base
        while len(ports) < n:
            if port not in used:
                ports.append(port)
            port += 1
            if port > 65535:
                raise OSError(f"distributed.port_base {port_base}: no {n} unused ports left")
    else:
        held = []
        try:
            while len(ports) < n:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)  # held until all are chosen: n different ports
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if port not in used:
                    ports.append(port)
        finally:
            for s in held:
                s.close()
    used.update(ports)
    return ports


def hostfile_json(ips: Sequence[str], ports: Sequence[int]) -> str:
    """mlx's ring hostfile: one list of "ip:port" per rank (mlx.launch's launch_ring)."""
    return json.dumps([[f"{ip}:{port}"] for ip, port in zip(ips, ports, strict=True)])


def backend_files(d: DistributedOptions, ips: Sequence[str], ports: Sequence[int]
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """({variable: file content}, {variable: value}) every rank needs, as mlx.launch gives
    them (mlx/_distributed_utils/launch.py): ring, MLX_HOSTFILE; jaccl, MLX_IBV_DEVICES
    (the RDMA device from each rank to each other, null to itself) and
    MLX_JACCL_COORDINATOR (rank 0's IP and its port)."""
    if d.backend == "jaccl":
        devices = [[dev or None for dev in row] for row in d.rdma]
        return ({"MLX_IBV_DEVICES": json.dumps(devices)},
                {"MLX_JACCL_COORDINATOR": f"{ips[0]}:{ports[0]}"})
    return {"MLX_HOSTFILE": hostfile_json(ips, ports)}, {}


def rank_output(output: Path, rank: int) -> Path:
    """Where rank `rank`'s stdout/stderr go: the attempt's log for rank 0."""
    return output if rank == 0 else output.with_name(f"{output.stem}-rank-{rank}{output.suffix}")


@dataclass
class RankEnd:
    rank: int
    returncode: int
    at: float  # monotonic
    collateral: bool  # it only lost a peer


@dataclass
class GroupProcess:
    """The ranks of one attempt as one WorkerProcess (module docstring)."""

    ranks: list[WorkerProcess]
    outputs: list[Path]
    hosts: list[str]
    grace: float
    remote: list[bool] = field(default_factory=list)
    culprit: int | None = None  # named by the watch (hang/stall), or found at the end
    named: bool = False  # the watch named the culprit (it failed even if it then saved)
    ends: dict[int, RankEnd] = field(default_factory=dict)
    _term_at: float | None = None  # when the others get SIGTERM
    _kill_at: float | None = None  # when whatever is left gets SIGKILL
    _result: int | None = None
    log: Any = None  # logs `group_rank_ended` the moment a rank's end is seen

    @property
    def pid(self) -> int:
        return self.ranks[0].pid

    @property
    def pids(self) -> tuple[int, ...]:
        """Each rank's pid; 0 for a remote rank (its pid is on another machine)."""
        return tuple(0 if self.remote and self.remote[r] else p.pid
                     for r, p in enumerate(self.ranks))

    def poll(self) -> int | None:
        if self._result is not None:
            return self._result
        now = time.monotonic()
        for r, proc in enumerate(self.ranks):
            if r not in self.ends:
                rc = proc.poll()
                if rc is not None:
                    # collateral: mlx said a peer was lost, or we had already stopped it
                    # because another rank failed (our SIGTERM can beat mlx's ~20 ms)
                    stopped = self._kill_at is not None and self.ending
                    lost = rc not in NORMAL_ENDS and (stopped or _lost_a_peer(self.outputs[r]))
                    self.ends[r] = RankEnd(r, rc, now, lost)
                    if self.log is not None:
                        (self.log.info if rc in NORMAL_ENDS or lost else self.log.warning)(
                            "group_rank_ended", rank=r, pid=proc.pid, returncode=rc,
                            lost_peer=lost, ranks_left=len(self.ranks) - len(self.ends))
        if not self.ends:
            return None
        if len(self.ends) == len(self.ranks):
            self._result = self._finish()
            return self._result
        if self.ending:  # the others are stopped at once
            self._term_at = now if self._term_at is None else min(self._term_at, now)
        elif 0 in self.ends and self._term_at is None:  # rank 0 is done: the others follow
            self._term_at = now + self.grace
        if self._term_at is None:  # ranks done before rank 0 (its test pass, COMPLETE)
            return None
        if self._kill_at is None and now >= self._term_at:
            self._signal_living(signal.SIGTERM)
            self._signal_living(signal.SIGCONT, group=True)
            self._kill_at = now + self.grace
        if self._kill_at is not None and now >= self._kill_at:
            self._signal_living(signal.SIGKILL, group=True)
        return None

    @property
    def ending(self) -> bool:
        """Whether a rank has ended abnormally: the group is ending (its silence is no hang)."""
        return any(e.returncode not in NORMAL_ENDS for e in self.ends.values())

    def next_deadline(self) -> float | None:
        """Monotonic time the group next needs a poll() (a SIGTERM or SIGKILL is due)."""
        if self._result is not None:
            return None
        return self._kill_at if self._kill_at is not None else self._term_at

    def _finish(self) -> int:
        ends = sorted(self.ends.values(), key=lambda e: (e.at, e.rank))
        failed = [e for e in ends if e.returncode not in NORMAL_ENDS]
        if self.culprit is None and failed:
            first = next((e for e in failed if not e.collateral), failed[0])
            self.culprit = first.rank
        if self.culprit is not None and failed:
            return self.ends[self.culprit].returncode
        return self.ends[0].returncode

    @property
    def failed_rank(self) -> int | None:
        """The rank that failed (after poll() returned), None when the group ended normally."""
        if self._result is None or (self._result in NORMAL_ENDS and not self.named):
            return None
        return self.culprit

    def name_culprit(self, rank: int) -> None:
        """The watch found `rank` silent or lagging (supervisor/daemon/group_watch.py): it
        is signalled first and named in the record."""
        if self._result is None:
            self.culprit, self.named = rank, True

    @property
    def failed_output(self) -> Path:
        """The output the classification reads: the failed rank's (else rank 0's)."""
        rank = self.failed_rank
        return self.outputs[rank if rank is not None else 0]

    def records(self) -> tuple[RankRecord, ...]:
        """Each rank for run.json: host, pid, return code, whether it only lost a peer."""
        out = []
        for r, proc in enumerate(self.ranks):
            e = self.ends.get(r)
            out.append(RankRecord(
                rank=r, host=self.hosts[r] or "localhost", pid=proc.pid,
                log=self.outputs[r].name,
                returncode=e.returncode if e is not None else None,
                lost_peer=e.collateral if e is not None else False))
        return tuple(out)

    def _order(self) -> list[int]:
        first = [self.culprit] if self.culprit is not None else []
        return first + [r for r in range(len(self.ranks)) if r not in first]

    def _signal_living(self, sig: int, group: bool = False) -> None:
        for r in self._order():
            if r not in self.ends:
                proc = self.ranks[r]
                (proc.signal_group if group else proc.signal)(sig)

    def signal(self, sig: int) -> None:
        """To every rank not yet reaped, the culprit first."""
        self._signal_living(sig)

    def signal_group(self, sig: int) -> None:
        self._signal_living(sig, group=True)

    def kill_all(self) -> None:
        """SIGKILL every rank's group and reap them (a start that failed half-way)."""
        for proc in self.ranks:
            proc.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(p.poll() is None for p in self.ranks) and time.monotonic() < deadline:
            time.sleep(0.01)


def spawner(base: PopenSpawner, config: Any, run_root: Path, log: Any,
            remote_telemetry: str = "") -> PopenSpawner | GroupSpawner:
    """The spawner of a run: `base` for one process, a GroupSpawner for a group;
    `remote_telemetry`: the CURVE tcp:// endpoint remote ranks send to
    (supervisor/daemon/curve.py)."""
    d: DistributedOptions = config.distributed
    if not d.enabled:
        return base
    return GroupSpawner(base, d, run_root, config.supervisor.stop_timeout, log,
                        remote_telemetry=remote_telemetry)


def telemetry_to(argv: list[str], endpoint: str) -> list[str]:
    """A worker's command line sending its telemetry to `endpoint` instead (a remote rank:
    the CURVE tcp:// endpoint; the ipc:// socket is on this machine only)."""
    out = list(argv)
    if endpoint and "--telemetry" in out:
        out[out.index("--telemetry") + 1] = endpoint
    return out


def _lost_a_peer(output: Path) -> bool:
    """Whether a rank's output ends with mlx saying a peer was lost (collateral)."""
    return any(PEER_LOST in line for line in tail_lines(output, OUTPUT_TAIL_BYTES)[-8:])


class GroupSpawner:
    """Starts one attempt's ranks (module docstring); `base` starts each local process."""

    def __init__(self, base: PopenSpawner, opts: DistributedOptions, run_root: Path,
                 stop_timeout: float, log: Any, python: str = "",
                 remote_telemetry: str = "") -> None:
        self.base = base
        self.opts = opts
        self.dir = run_root / "group"
        self.grace = max(0.5, min(stop_timeout, ORPHAN_GRACE))
        self.log = log
        self.python = python
        self.remote_telemetry = remote_telemetry
        self.used_ports: set[int] = set()
        self.last: GroupProcess | None = None
        self.attempts = 0

    def spawn(self, argv: Sequence[str], env: dict[str, str], output: Path) -> WorkerProcess:
        self._bury_last()
        n, d = self.opts.processes, self.opts
        hosts = [d.host(r) for r in range(n)]
        remote = [h.split("@")[-1] not in ("", "localhost", "127.0.0.1") for h in hosts]
        ips = [resolve_ip(h) if remote[r] else "127.0.0.1" for r, h in enumerate(hosts)]
        ports = fresh_ports(n, self.used_ports, d.port_base)
        self.attempts += 1
        self.dir.mkdir(mode=0o700, exist_ok=True)
        files, extra = backend_files(d, ips, ports)  # what each rank's backend reads
        paths = {}
        for name, content in files.items():
            path = self.dir / f"hostfile-{self.attempts}-{os.getpid()}-{name}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(content)
            paths[name] = str(path)
        hostfile = paths.get("MLX_HOSTFILE", "")
        started: list[WorkerProcess] = []
        outputs = [rank_output(output, r) for r in range(n)]
        group = GroupProcess(started, outputs, hosts, self.grace, remote, log=self.log)
        try:
            for r in range(n):
                rank_env = {**env, **paths, **extra, "MLX_RANK": str(r), WORLD_ENV: str(n)}
                if remote[r]:
                    cmd = remote_argv(hosts[r], telemetry_to(list(argv), self.remote_telemetry),
                                      rank_env, files, d.python or self.python)
                    started.append(self.base.spawn(cmd, {**env, **secrets_env(rank_env)},
                                                   outputs[r]))
                else:
                    started.append(self.base.spawn(argv, rank_env, outputs[r]))
        except BaseException:
            group.kill_all()
            raise
        self.log.info("group_spawned", size=n, backend=d.backend, hostfile=hostfile,
                      ports=ports, pids=[p.pid for p in started],
                      hosts=[h or "localhost" for h in hosts])
        self.last = group
        return group

    def _bury_last(self) -> None:
        """Every rank of the previous attempt must be dead before the next starts."""
        last = self.last
        if last is None:
            return
        alive = [r for r, p in enumerate(last.ranks) if p.poll() is None]
        if alive:
            self.log.warning("group_ranks_left", ranks=alive, action="SIGKILL")
            last.kill_all()
        with contextlib.suppress(OSError):
            for old in self.dir.glob("hostfile-*"):
                old.unlink()


def group_end(group: GroupProcess, end: Any) -> Any:
    """An attempt's Ending (supervisor/daemon/ending.py) with the failed rank named first in
    its classification's detail: "rank 1 (pid 4242): killed by SIGKILL ...". The
    classification itself is the failed rank's (its return code and output)."""
    rank = group.failed_rank
    c = end.classification
    if rank is None or c.detail.startswith(f"rank {rank}"):
        return end
    pid = group.ranks[rank].pid
    host = group.hosts[rank]
    where = f"rank {rank} (pid {pid}{' on ' + host if host else ''})"
    return dataclasses.replace(
        end, classification=dataclasses.replace(c, detail=f"{where}: {c.detail}"))


def group_fields(group: GroupProcess | None) -> dict[str, Any]:
    """The AttemptRecord fields of a group's attempt (none for one process)."""
    if group is None:
        return {}
    return {"ranks": group.records(), "failed_rank": group.failed_rank}
