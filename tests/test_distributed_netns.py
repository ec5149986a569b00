"""A link pulled between two ranks: each rank in its own network namespace, joined by a veth
pair (as root), the ring between 10.214.x.1 and 10.214.x.2. `ip link set down` in the middle
of training leaves both ranks blocked in a collective with their heartbeats flowing — the
supervisor must call it a stall (no group step for stall_timeout), kill the group (a rank
blocked in a collective never runs its SIGTERM handler) and, once the link is back, finish.

Each rank is put in its namespace by a small wrapper given as `supervisor.worker_command`:
it rewrites the supervisor's hostfile (127.0.0.1) to the namespaces' addresses, same ports,
and execs `ip netns exec NS python -m worker ...` (the same process: the orphan guard, the
parent-death signal and the run lock's descriptor carry over). Telemetry stays on ipc://
(a Unix socket path is reachable from any network namespace).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import overnight, write_config
from tests.supervisor_support import events, record, wait_for
from tests.test_distributed_e2e import FAST, last_step, mixed_corpus, supervise

ITERS = 40  # steps of the group run (see the test)

WRAPPER = """\
import json, os, sys
r = int(os.environ["MLX_RANK"])
ns = os.environ["OVN14_NS"].split(",")[r]
ips = os.environ["OVN14_IPS"].split(",")
hostfile = json.load(open(os.environ["MLX_HOSTFILE"]))
moved = [[f"{ips[i]}:{h[0].rsplit(':', 1)[1]}"] for i, h in enumerate(hostfile)]
path = os.environ["MLX_HOSTFILE"] + f".ns{r}"
with open(path, "w") as f:
    json.dump(moved, f)
os.environ["MLX_HOSTFILE"] = path
os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, "-m", "worker", *sys.argv[1:]])
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces():
    """Two namespaces joined by a veth pair; removed afterwards (with their links)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to pull a link between ranks")
    tag = f"{os.getpid() % 100000}"
    ns = [f"ovn14a{tag}", f"ovn14b{tag}"]
    dev = [f"va{tag}", f"vb{tag}"]
    sub = 1 + os.getpid() % 250
    ips = [f"10.214.{sub}.1", f"10.214.{sub}.2"]
    made = _ip("netns", "add", ns[0])
    if made.returncode != 0:
        pytest.skip(f"network namespaces unavailable here: {made.stderr.strip()}")
    try:
        steps = [("netns", "add", ns[1]),
                 ("link", "add", dev[0], "type", "veth", "peer", "name", dev[1]),
                 ("link", "set", dev[0], "netns", ns[0]), ("link", "set", dev[1], "netns", ns[1])]
        for i in (0, 1):
            steps += [("-n", ns[i], "addr", "add", f"{ips[i]}/24", "dev", dev[i]),
                      ("-n", ns[i], "link", "set", dev[i], "up"),
                      ("-n", ns[i], "link", "set", "lo", "up")]
        for step in steps:
            res = _ip(*step)
            if res.returncode != 0:
                pytest.skip(f"ip {' '.join(step)}: {res.stderr.strip()}")
        yield ns, dev, ips
    finally:
        for name in ns:
            _ip("netns", "del", name)  # deletes the veth pair with it


@pytest.mark.slow
def test_a_pulled_link_is_a_stall_and_the_group_recovers(tmp_path, tiny_model, namespaces):
    ns, dev, ips = namespaces
    wrapper = tmp_path / "netns_rank.py"
    wrapper.write_text(WRAPPER)
    data = mixed_corpus(tmp_path / "data")
    # enough steps that the run is still training when the link is pulled at step 5 (12
    # steps finished in 2.1 s on a fast day: the link went down after the run had ended)
    config = write_config(tmp_path / "netns.yaml", tiny_model, data, iters=ITERS, batch_size=4,
                          save_every=4, steps_per_eval=8, distributed={"processes": 2},
                          supervisor={**FAST, "stall_timeout": 5.0, "stop_timeout": 3.0,
                                      "worker_command": [sys.executable, str(wrapper)]})
    run_dir = tmp_path / "run"
    sup = supervise(config, run_dir, OVN14_NS=",".join(ns), OVN14_IPS=",".join(ips))
    try:
        wait_for(lambda: last_step(run_dir) >= 5, timeout=120)
        assert _ip("-n", ns[1], "link", "set", dev[1], "down").returncode == 0
        pulled = time.monotonic()
        live = overnight("status", str(run_dir), timeout=60).stdout  # both ranks, blocked
        assert "rank 0   pid" in live and "rank 1   pid" in live and "phase training" in live
        unhealthy = wait_for(lambda: events(run_dir, "worker_unhealthy"), timeout=60)[0]
        detected = time.monotonic() - pulled
        wait_for(lambda: len(events(run_dir, "group_spawned")) >= 2, timeout=60)
        assert _ip("-n", ns[1], "link", "set", dev[1], "up").returncode == 0
        _, err = sup.communicate(timeout=180)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    print(f"\nlink pulled -> stall noticed {detected:.1f} s (stall_timeout 5 s)")
    assert sup.returncode == 0, err[-3000:]
    assert unhealthy["kind"] == "stall" and "no rank stands out" in unhealthy["detail"]
    attempts = record(run_dir)["attempts"]
    assert [a["classification"] for a in attempts] == ["stall", "completed"], [
        (a["classification"], a["detail"]) for a in attempts]
    assert attempts[0]["detected_by"] == "stall_timeout"
    assert attempts[0]["killed_after_stop_timeout"]  # blocked in a collective: SIGKILL
    assert record(run_dir)["final_step"] == ITERS
    assert Path(run_dir / "COMPLETE").exists()
