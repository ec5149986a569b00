"""The fault campaign (issue 12): real supervised runs of the tiny model under randomly
chosen, randomly timed faults, judged fault by fault.

    python -m tests.chaos --faults 200 --seed 1 --out chaos.json     # the full campaign
    python -m pytest -q tests/test_chaos_quick.py                    # ~30 faults

Not collected by pytest (no `test_*.py` here); tests/test_chaos_quick.py calls
`tests.chaos.campaign.run_campaign`. The pieces: kinds.py (what each fault is and what the
supervisor must make of it), plan.py (which faults in which runs at which steps, from the
seed), driver.py (one run: start `overnight run`, wait for each fault's moment, cause it,
wait for the next attempt), faults.py (causing each kind), corrupt.py / garbage.py /
diskfull.py / inotify.py (the means), judge.py (classified right, recovered, corrupt
accepted, Δ), table.py (the table per kind), campaign.py (the reference runs and the whole).

This file imports nothing: every supervisor starts through `python -m tests.chaos.launch`,
which must not load the campaign (nor see it half-edited).
"""
