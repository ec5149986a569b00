"""`python -m tests.chaos`: the fault campaign (see tests/chaos/__init__.py).

    python -m tests.chaos --faults 200 --seed 1 --out chaos.json
    python -m tests.chaos --faults 20 --kinds corrupt,worker_kill --jobs 1
    python -m tests.chaos --faults 30 --seed 12 --only-run 7     # one run of that campaign again
    python -m tests.chaos --table chaos.json                     # the table of a results file
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.chaos.campaign import Options

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def main(argv: list[str] | None = None) -> int:
    # Before anything starts a thread (numpy's BLAS pool does, at import): a thread that
    # does not block them would take the default action and end the campaign uncleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from tests.chaos import table
    from tests.chaos.campaign import Options, run_campaign
    from tests.chaos.kinds import KINDS, parse_kinds

    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Supervised runs of a tiny model under randomly chosen, randomly timed "
                    "faults; prints a table per fault kind.")
    parser.add_argument("--faults", type=int, default=200, help="faults to inject (200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (0)")
    parser.add_argument("--kinds", default="all",
                        help="comma-separated kinds, or groups corrupt, signals, socket, all; "
                             f"kinds: {', '.join(KINDS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here as JSON (rewritten after every run)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (1; each run is 2-3 processes)")
    parser.add_argument("--iters", type=int, default=100, help="steps per run (100)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where runs are kept (default: a new temp dir)")
    parser.add_argument("--only-run", type=int, action="append", default=None,
                        metavar="N", help="run only run N of the plan (repeatable): to "
                        "reproduce one run of a campaign with the same --faults/--seed")
    parser.add_argument("--no-reference-check", action="store_true",
                        help="skip the second uninterrupted run (reproducibility check)")
    parser.add_argument("--table", type=Path, default=None, metavar="RESULTS",
                        help="only print the table of a results file written by --out")
    args = parser.parse_args(argv)
    if args.table is not None:
        data, rows = table.load(args.table)
        print(table.markdown(rows))
        print(f"\n{data.get('faults_fired')} faults, {data.get('seconds')} s "
              f"({data.get('seconds_per_fault')} s per fault), complete: {data.get('complete')}; "
              f"{data.get('options', {}).get('command', '')}")
        return 0
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as e:
        parser.error(str(e))
    if args.faults < 1 or args.jobs < 1 or args.iters < 60:
        parser.error("--faults and --jobs must be >= 1, --iters >= 60")
    command = "python -m tests.chaos " + " ".join(shlex.quote(a) for a in
                                                  (argv if argv is not None else sys.argv[1:]))
    opts = Options(faults=args.faults, seed=args.seed, kinds=kinds, out=args.out,
                   jobs=args.jobs, iters=args.iters, workdir=args.workdir, command=command,
                   only_runs=args.only_run, check_reference=not args.no_reference_check)
    _watch_signals(opts)
    try:
        campaign = run_campaign(opts)
    except KeyboardInterrupt:
        print("interrupted: runs stopped and cleaned up; --out holds what was done",
              file=sys.stderr)
        return 130
    print()
    print(table.markdown(campaign.table))
    print()
    print(campaign.summary())
    return 0 if all(row.ok for row in campaign.table if row.injected) else 1


def _watch_signals(opts: Options) -> None:
    """Ctrl-C or `kill PID` stops the campaign cleanly (the runs stop, their processes and
    mounts are cleaned up, --out keeps what was done) and the log names who sent it: the
    signals are blocked in every thread (`main` blocks them first; tests/chaos/launch.py
    clears the mask for the supervisors) and taken by one thread with sigwaitinfo, which sees
    the sender's pid."""
    import psutil

    def wait() -> None:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        sender = f"pid {info.si_pid}"
        with contextlib.suppress(psutil.Error):
            sender += f" ({' '.join(psutil.Process(info.si_pid).cmdline())[:300]})"
        print(f"{time.strftime('%H:%M:%S')} received {signal.Signals(info.si_signo).name} "
              f"from {sender}", file=sys.stderr, flush=True)
        opts.stop.set()

    threading.Thread(target=wait, name="signals", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
