"""A data-parallel group without MLX: the config's `distributed:` section, ports and hostfiles,
the ssh launch of a remote rank, the group as one process (real child processes and
signals), the group watch and the telemetry gate's ranks. The real group on MLX is
tests/test_distributed_e2e.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import config as cfg
from shared.errors import ConfigError
from shared.protocol import Heartbeat, Phase, StepMetrics
from supervisor.daemon.group import GroupProcess, fresh_ports, hostfile_json, rank_output
from supervisor.daemon.group_remote import (
    SECRETS_ENV,
    launch_script,
    remote_argv,
    secrets_env,
)
from supervisor.daemon.group_watch import GroupView, check
from supervisor.daemon.spawn import PopenSpawner
from supervisor.daemon.telemetry_gate import TelemetryGate, new_token
from supervisor.daemon.watch import AttemptView
from tests.conftest import overnight, write_config

# ---- the config --------------------------------------------------------------------------


def base(**distributed: object) -> dict[str, object]:
    return {"model": "m", "data": "d", "batch_size": 4, "distributed": distributed}


@pytest.mark.parametrize("section, key", [
    ({"processes": 3}, "batch_size: expected a multiple of distributed.processes (3)"),
    ({"processes": 2, "hosts": ["mac-a"]}, "distributed.hosts: expected one host per rank"),
    ({"processes": 2, "hosts": ["mac-a", "-oProxyCommand=x"]}, "distributed.hosts"),
    ({"processes": 0}, "distributed.processes: expected an integer 1..64"),
    ({"processes": 2, "backend": "mpi"}, "distributed.backend"),
    ({"processes": 2, "backend": "jaccl"}, "distributed.backend: expected ring on one machine"),
    ({"processes": 2, "backend": "jaccl", "hosts": ["a", "b"], "rdma": [["", "en2"]]},
     "distributed.rdma: expected for jaccl, 2 rows of 2"),
    ({"processes": 2, "backend": "jaccl", "hosts": ["a", "b"],
      "rdma": [["en2", "en2"], ["en2", ""]]}, "distributed.rdma"),
    ({"processes": 2, "port_base": 80}, "distributed.port_base"),
])
def test_a_group_that_cannot_work_is_one_config_error(section, key) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.resolve(base(**section))
    assert key in str(e.value)


def test_a_halved_micro_batch_from_the_command_line_is_accepted() -> None:
    """After an OOM the supervisor passes --set batch_size=1 to both ranks."""
    c = cfg.resolve({"model": "m", "data": "d", "batch_size": 2,
                     "distributed": {"processes": 2}}, {"batch_size": 1})
    assert c.batch_size == 1 and c.distributed.processes == 2


def test_the_group_size_is_not_in_the_config_hash() -> None:
    one = cfg.resolve(base(processes=1))
    two = cfg.resolve(base(processes=2))
    assert one.hash() == two.hash()


def test_overnight_run_refuses_a_world_size_that_does_not_divide_the_batch(
        tmp_path, tiny_model, corpus) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus, batch_size=3,
                          distributed={"processes": 2})
    res = overnight("run", str(config), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert res.returncode == 78
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size: expected a multiple of" in lines[0], res.stderr
    assert str(config) in lines[0]


def test_an_unreachable_host_is_one_line_exit_78(tmp_path, tiny_model, corpus) -> None:
    """127.0.0.2 is another address of this machine with no ssh server: refused at start."""
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus,
                          distributed={"processes": 2, "hosts": ["127.0.0.1", "127.0.0.2"]},
                          supervisor={"caffeinate": False})
    res = overnight("run", str(config), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert res.returncode == 78, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("overnight run: distributed.hosts: '127.0.0.2' is unreachable "
                               "over ssh"), lines[0]
    assert not (tmp_path / "run" / "logs" / "worker-1.log").exists()  # nothing started


def test_a_rank_started_by_hand_is_told_to_use_overnight_run(tmp_path, tiny_model,
                                                            corpus) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_model, corpus,
                          distributed={"processes": 2})
    res = overnight("train", str(config), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert res.returncode == 78
    assert res.stderr.strip().splitlines()[-1].startswith(
        "overnight train: distributed.processes is 2: the ranks of a group are started by "
        "`overnight run`")


def test_a_rank_takes_every_size_th_example_and_its_own_dropout_seed() -> None:
    from worker.distributed import Group, dropout_seed, local_micro_batch, shard

    batch = list(range(7))
    assert shard(batch, Group(0, 2, None)) == [0, 2, 4, 6]
    assert shard(batch, Group(1, 2, None)) == [1, 3, 5]
    assert local_micro_batch(8, 2) == 4 and local_micro_batch(1, 2) == 1  # after an OOM
    # rank 0 keeps worker/train.py's single-process seed: seed*1000003 + step*1009 + j
    assert dropout_seed(3, 5, 0, 1) == 3 * 1_000_003 + 5 * 1_009 + 1
    seeds = {dropout_seed(3, step, rank, j) for step in range(50) for rank in range(4)
             for j in range(4)}
    assert len(seeds) == 50 * 4 * 4


def test_a_sigterm_arriving_during_the_agreement_is_kept_for_the_next() -> None:
    """A rank blocked in the agreement's collective runs its SIGTERM handler only when the
    collective returns: the request must survive this agreement's (older) answer."""
    from worker.distributed import Group, agree_controls
    from worker.train import Controls

    raw, agreed = Controls(), Controls()
    answers: list[list[bool]] = []

    class Collective(Group):
        def agree(self, flags: list[bool]) -> list[bool]:
            if not answers:
                raw.stop_requested, raw.stop_reason = True, "signal SIGTERM"  # mid-wait
            answers.append(list(flags))
            return list(flags)  # the other rank asked for nothing

    group = Collective(0, 2, None, raw=raw)
    agree_controls(group, agreed)
    assert not agreed.stop_requested  # not agreed yet: both ranks go on alike
    agree_controls(group, agreed)
    assert agreed.stop_requested and agreed.stop_reason == "signal SIGTERM"
    assert answers == [[False, False], [True, False]]


# ---- ports, hostfile, ssh ----------------------------------------------------------------


def test_every_attempt_gets_ports_no_earlier_attempt_used() -> None:
    used: set[int] = set()
    seen: list[int] = []
    for _ in range(20):
        ports = fresh_ports(2, used)
        assert len(set(ports)) == 2 and not set(ports) & set(seen)
        seen += ports
    assert fresh_ports(3, {7001}, port_base=7000) == [7000, 7002, 7003]


def test_the_hostfile_is_mlx_rings_format() -> None:
    # mlx.launch's launch_ring: one list of "ip:port" per rank
    assert json.loads(hostfile_json(["127.0.0.1", "10.0.0.2"], [5000, 5001])) == [
        ["127.0.0.1:5000"], ["10.0.0.2:5001"]]
    assert rank_output(Path("logs/worker-3.log"), 0) == Path("logs/worker-3.log")
    assert rank_output(Path("logs/worker-3.log"), 1) == Path("logs/worker-3-rank-1.log")


def test_a_remote_rank_is_ssh_tt_with_no_secret_on_its_command_line() -> None:
    env = {"MLX_RANK": "1", "OVERNIGHT_WORLD_SIZE": "2", "OVERNIGHT_TELEMETRY_TOKEN": "s3cret",
           "OVERNIGHT_CURVE_SECRET": "k3y", "HOME": "/x"}
    argv = remote_argv("me@mac-b", ["/usr/bin/python3", "-m", "worker", "train", "c.yaml"],
                       env, '[["10.0.0.1:5000"],["10.0.0.2:5001"]]', python="/opt/py",
                       cwd="/Users/me/proj")
    assert argv[:2] == ["ssh", "-tt"] and argv[-2] == "me@mac-b"
    assert "BatchMode=yes" in argv and f"SendEnv={SECRETS_ENV}" in argv
    assert "s3cret" not in " ".join(argv) and "k3y" not in " ".join(argv)
    assert "export MLX_RANK=1;" in argv[-1] and "HOME" not in argv[-1]
    assert argv[-1].endswith("exec /opt/py -m worker train c.yaml")
    assert set(secrets_env(env)) == {SECRETS_ENV}


def test_jaccl_gets_mlx_launchs_variables() -> None:
    from supervisor.daemon.group import backend_files

    d = cfg.resolve({**base(processes=2, backend="jaccl", hosts=["mac-a", "mac-b"],
                            rdma=[["", "rdma_en2"], ["rdma_en3", ""]])}).distributed
    files, env = backend_files(d, ["10.0.0.1", "10.0.0.2"], [5000, 5001])
    # mlx.launch's launch_jaccl: MLX_IBV_DEVICES (a file: null to itself), the coordinator
    assert json.loads(files["MLX_IBV_DEVICES"]) == [[None, "rdma_en2"], ["rdma_en3", None]]
    assert env == {"MLX_JACCL_COORDINATOR": "10.0.0.1:5000"}
    ring = cfg.resolve(base(processes=2)).distributed
    assert backend_files(ring, ["127.0.0.1"] * 2, [7, 8]) == (
        {"MLX_HOSTFILE": '[["127.0.0.1:7"], ["127.0.0.1:8"]]'}, {})
    script = launch_script(["py", "-m", "worker"], {"MLX_JACCL_COORDINATOR": "10.0.0.1:5000",
                                                    "MLX_RANK": "1"}, files, "/w", "")
    assert "export MLX_IBV_DEVICES=$fname;" in script
    assert "export MLX_JACCL_COORDINATOR=10.0.0.1:5000;" in script


def test_a_remote_rank_sends_its_telemetry_to_the_curve_endpoint() -> None:
    from supervisor.daemon.group import telemetry_to

    argv = ["py", "-m", "worker", "train", "c.yaml", "--telemetry", "ipc:///r/sock/telemetry",
            "--attempt", "2"]
    assert telemetry_to(argv, "tcp://10.0.0.1:5555") == [
        "py", "-m", "worker", "train", "c.yaml", "--telemetry", "tcp://10.0.0.1:5555",
        "--attempt", "2"]
    assert telemetry_to(argv, "") == argv  # a local rank keeps ipc://


def test_the_launch_script_runs_the_rank_with_its_hostfile_and_secrets(tmp_path) -> None:
    """The script a remote rank runs, run here by bash as sshd would run it."""
    probe = ("import os,json; print(json.dumps({k: os.environ.get(k) for k in "
             "('MLX_RANK','OVERNIGHT_TELEMETRY_TOKEN','LC_OVERNIGHT')} | "
             "{'hostfile': open(os.environ['MLX_HOSTFILE']).read(), 'cwd': os.getcwd()}))")
    env = {"MLX_RANK": "1", "OVERNIGHT_TELEMETRY_TOKEN": "t0k'en"}
    script = launch_script([sys.executable, "-c", probe], env, '[["a:1"],["b:2"]]',
                           str(tmp_path), "")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], **secrets_env(env)})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"MLX_RANK": "1", "OVERNIGHT_TELEMETRY_TOKEN": "t0k'en", "LC_OVERNIGHT": None,
                   "hostfile": '[["a:1"],["b:2"]]', "cwd": str(tmp_path)}
    missing = launch_script([sys.executable, "-c", "0"], env, "[]", str(tmp_path / "no"), "")
    res = subprocess.run(["bash", "-c", missing], capture_output=True, text=True, timeout=30)
    assert res.returncode == 78 and "no directory" in res.stderr


# ---- the group as one process (real processes, real signals) -----------------------------


RANK0_LOSES_PEER = ("import signal,sys,time\n"
                    "def term(*a):\n"
                    "    print('RuntimeError: [ring] connection to a peer was lost', "
                    "file=sys.stderr, flush=True); sys.exit(1)\n"
                    "signal.signal(signal.SIGTERM, term)\n"
                    "time.sleep(60)\n")
DEAF = "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"


def start_group(tmp: Path, scripts: list[str], grace: float = 0.5) -> GroupProcess:
    spawner = PopenSpawner(stop_timeout=2.0)
    outputs = [tmp / f"rank{r}.log" for r in range(len(scripts))]
    ranks = [spawner.spawn([sys.executable, "-c", s], dict(os.environ), outputs[r])
             for r, s in enumerate(scripts)]
    time.sleep(0.5)  # the scripts have installed their handlers
    return GroupProcess(ranks, outputs, ["", ""], grace, [False, False])


def wait_rc(group: GroupProcess, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = group.poll()
        if rc is not None:
            return rc
        time.sleep(0.02)
    raise AssertionError("the group did not end")


def test_a_rank_exiting_non_zero_ends_the_group_and_is_named(tmp_path) -> None:
    group = start_group(tmp_path, [RANK0_LOSES_PEER, "import sys; sys.exit(3)"])
    assert wait_rc(group) == 3
    assert group.failed_rank == 1 and group.failed_output == tmp_path / "rank1.log"
    ranks = group.records()
    assert (ranks[0].returncode, ranks[0].lost_peer) == (1, True)  # collateral
    assert (ranks[1].returncode, ranks[1].lost_peer) == (3, False)
    assert all(not _alive(p.pid) for p in group.ranks)


def test_a_rank_deaf_to_sigterm_is_killed_after_the_grace(tmp_path) -> None:
    t0 = time.monotonic()
    group = start_group(tmp_path, [DEAF, "import os,signal; os.kill(os.getpid(), 9)"])
    assert wait_rc(group) == -9
    assert group.failed_rank == 1 and group.records()[0].returncode == -9
    assert 0.5 <= time.monotonic() - t0 < 5


def test_a_silent_rank_named_by_the_watch_gets_the_signals_first(tmp_path) -> None:
    group = start_group(tmp_path, [DEAF, DEAF])
    os.kill(group.ranks[1].pid, signal.SIGSTOP)
    group.name_culprit(1)
    assert group._order() == [1, 0]
    group.signal_group(signal.SIGKILL)
    assert wait_rc(group) == -9 and group.failed_rank == 1


def test_ranks_done_first_wait_for_rank_0s_test_pass(tmp_path) -> None:
    """Rank 1 completes (exit 0) while rank 0 still runs its test pass and writes COMPLETE:
    rank 0 is not stopped however long that takes (here 3 x the grace)."""
    group = start_group(tmp_path, ["import time; time.sleep(1.5)", "import sys; sys.exit(0)"])
    assert wait_rc(group) == 0
    assert [r.returncode for r in group.records()] == [0, 0] and group.failed_rank is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- the group watch ---------------------------------------------------------------------


OPTS = cfg.resolve({"model": "m", "data": "d", "supervisor": {
    "heartbeat_timeout": 10, "startup_timeout": 100, "stall_timeout": 30}}).supervisor


def beat(rank: int, step: int, phase: Phase = Phase.TRAINING) -> Heartbeat:
    return Heartbeat(run_id="r", pid=100 + rank, attempt=1, seq=1, time=0.0, phase=phase,
                     step=step, total_steps=40, last_step_time=0.0, active_mb=1.0,
                     peak_mb=1.0, rss_mb=1.0, dropped=0, rank=rank)


def views() -> tuple[AttemptView, GroupView]:
    view = AttemptView(1, 100, 0.0, 0)
    group = GroupView(2, 0.0, 0)
    for msg in (beat(0, 1), beat(1, 1)):
        view.update(msg, 1.0) if msg.rank == 0 else None
        group.update(msg, 1.0)
    return view, group


def test_a_rank_that_stops_beating_is_a_hang_naming_it() -> None:
    view, group = views()
    for t in range(2, 12):  # rank 0 beats on (blocked in a collective), rank 1 is silent
        view.update(beat(0, 1), float(t))
        group.update(beat(0, 1), float(t))
    assert check(view, group, OPTS, 10.5) is None
    kind, seconds, detail, rank = check(view, group, OPTS, 11.0)  # type: ignore[misc]
    assert (kind, seconds, rank) == ("hang", 10.0, 1)
    assert detail.startswith("rank 1: no heartbeat for 10.0 s")


def test_no_group_step_while_heartbeats_flow_is_a_stall_naming_the_laggard() -> None:
    view, group = views()
    group.update(StepMetrics(run_id="r", attempt=1, step=2, time=0.0, loss=1.0, grad_norm=1.0,
                             lr=1.0, tokens=1, tokens_per_sec=1.0, step_seconds=1.0,
                             active_mb=1.0, peak_mb=1.0, rss_mb=1.0), 2.0)  # rank 0 at 2
    view.update(beat(0, 2), 2.0)
    for t in range(3, 40):
        for r in (0, 1):
            group.update(beat(r, 2 if r == 0 else 1), float(t))
        view.update(beat(0, 2), float(t))
    assert group.step == 1
    assert check(view, group, OPTS, 31.9) is None  # rank 0's last step was at t=2
    kind, _, detail, rank = check(view, group, OPTS, 32.0)  # type: ignore[misc]
    assert (kind, rank) == ("stall", 1) and "rank 1 lags" in detail


def test_a_rank_that_said_it_stops_is_not_a_hang_when_silent() -> None:
    from shared.protocol import WorkerStopping

    view, group = views()
    group.update(WorkerStopping(run_id="r", attempt=1, step=1, exit_code=0,
                                reason="completed", detail="", rank=1), 1.5)
    for t in range(2, 30):
        view.update(beat(0, 1), float(t))
        group.update(beat(0, 1), float(t))
    assert check(view, group, OPTS, 20.0) is None  # rank 0's test pass: nobody is silent


def test_one_process_keeps_its_checks_and_words() -> None:
    view = AttemptView(1, 100, 0.0, 0)
    view.update(beat(0, 1), 1.0)
    assert check(view, None, OPTS, 10.9) is None
    assert check(view, None, OPTS, 11.0) == ("hang", 10.0, "no heartbeat for 10.0 s", None)


# ---- the gate ----------------------------------------------------------------------------


def test_the_gate_believes_each_rank_with_its_own_pid_only() -> None:
    gate, token = TelemetryGate(), new_token()
    gate.begin(attempt=1, pid=100, token=token, total_steps=40, rank_pids=(100, 101))
    ok = beat(1, 3).with_token(token)
    assert gate.admit(ok) and gate.admit(beat(0, 3).with_token(token))
    forged = Heartbeat(**{**beat(1, 4).__dict__, "pid": 100}).with_token(token)
    assert not gate.admit(forged) and "rank 1 is pid 101" in gate.last_reason
    assert not gate.admit(beat(2, 4).with_token(token))
    assert "rank 2, the group has 2" in gate.last_reason
    assert gate.admit(beat(1, 3).with_token(token))  # steps forward per rank, not across
