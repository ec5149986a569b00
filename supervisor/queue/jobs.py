"""Making jobs: `overnight queue add CONFIG [--name N] [--set k=v]... [--sweep k=a,b]...`.

A job is a config file of its own, QUEUE_DIR/jobs/<name>.yaml: the given YAML with the job's
`--set` values applied, checked by the config's own `resolve()` before the job is queued (a
bad key or value is one line now, not a job that gives up at 2 am). The file is a snapshot:
editing the source YAML later does not change a queued job, and the morning report shows
what really ran. Relative paths in it (model, data) stay relative to where `queue add` ran:
the job's supervisor runs there (`Job.cwd`), as `overnight run` typed there would.

`--sweep key=v1,v2,...` (repeatable) expands into one job per combination — the product over
the keys, in the order given, the last key varying fastest — named
`<name>-<leaf><value>-...` (`mini-learning_rate1e-5-rank8`), values read as `--set` reads
them (shared/overrides.py). Commas inside brackets belong to one value
(`--sweep lora_parameters.keys=[a,b],[c]`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from shared import config as config_mod
from shared.errors import ConfigError
from shared.fsutil import atomic_write_bytes
from shared.overrides import parse_set
from shared.queue_file import Job, Queue, QueueError, now_iso
from shared.yamlfile import load_yaml

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
NAME_MAX = 80


def split_values(text: str) -> list[str]:
    """"a,b,[c,d]" -> ["a", "b", "[c,d]"]: commas at bracket depth 0 separate."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def expand(sets: list[str], sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """[(name suffix, ["key=value", ...])]: one per combination of the sweeps (one with no
    suffix when there are none); ConfigError for a sweep without key or values."""
    axes: list[list[tuple[str, str]]] = []
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for sweep in sweeps:
        key, sep, text = sweep.partition("=")
        key = key.strip()
        values = [v for v in split_values(text)] if sep else []
        if not key or not values or any(not v for v in values):
            raise ConfigError(f"--sweep: expected KEY=V1,V2,..., got {sweep!r}")
        if len(set(values)) != len(values):
            raise ConfigError(f"--sweep {key}: a value is given twice in {text!r}")
        # the same key twice would make one job holding both values (the last one wins)
        if any(k == key for axis in axes for k, _ in axis[:1]):
            raise ConfigError(f"--sweep {key}: swept twice; give its values in one --sweep "
                              "(KEY=V1,V2,...)")
        if key in set_keys:
            raise ConfigError(f"--sweep {key}: also given with --set; one of them")
        axes.append([(key, v) for v in values])
    combos: list[tuple[str, list[str]]] = []
    for combo in itertools.product(*axes):
        suffix = "-".join(_safe(f"{k.rsplit('.', 1)[-1]}{v}") for k, v in combo)
        combos.append((suffix, [*sets, *(f"{k}={v}" for k, v in combo)]))
    return combos


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.") or "x"


def check_name(name: str) -> str:
    if not name or len(name) > NAME_MAX or _UNSAFE.search(name) or name[0] in ".-":
        raise ConfigError(f"--name: expected letters, digits, '.', '_' or '-' (not first), at "
                          f"most {NAME_MAX}, got {name!r}")
    return name


def make_jobs(queue_dir: Path, config: Path, name: str | None, sets: list[str],
              sweeps: list[str], cwd: Path) -> list[tuple[Job, dict[str, Any]]]:
    """The jobs `queue add` would add, with each one's YAML (not yet written or queued);
    ConfigError naming the file and key for a config or value that cannot work."""
    source = (cwd / config).resolve()
    base_values = load_yaml(source)  # ConfigError: missing, unreadable, invalid YAML
    base = check_name(name) if name else _safe(source.stem)
    jobs = []
    for suffix, settings in expand(sets, sweeps):
        job_name = f"{base}-{suffix}" if suffix else base
        check_name(job_name[:NAME_MAX])
        overrides = dict(parse_set(s) for s in settings)
        config_mod.resolve(base_values, overrides, source=f"{source} ({job_name})")
        values = yaml.safe_load(yaml.safe_dump(base_values))  # a deep copy, as YAML sees it
        for key, value in overrides.items():
            config_mod._set_dotted(values, key, value)  # the config's own --set rule
        job = Job(name=job_name[:NAME_MAX], config=str(queue_dir / "jobs" / f"{job_name}.yaml"),
                  source=str(source), cwd=str(cwd), run_dir=str(queue_dir / "runs" / job_name),
                  settings=settings, added=now_iso())
        jobs.append((job, values))
    return jobs


def add(queue: Queue, new: list[tuple[Job, dict[str, Any]]]) -> tuple[Queue, list[Job]]:
    """The queue with `new` appended (their YAML written first); QueueError for a name in
    use (a finished job keeps its name: its run directory is its result)."""
    taken = {j.name for j in queue.jobs}
    for job, _ in new:
        if job.name in taken:
            raise QueueError(f"a job named {job.name!r} is already in the queue; pass --name")
        taken.add(job.name)
    for job, values in new:
        target = Path(job.config)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            text = (f"# overnight queue job {job.name}: {job.source}"
                    + "".join(f" --set {s}" for s in job.settings) + "\n"
                    + yaml.safe_dump(values, sort_keys=False))
            atomic_write_bytes(target, text.encode())
        except OSError as e:
            raise QueueError(f"{target}: cannot write the job's config "
                             f"({e.strerror or e})") from None
    jobs = [job for job, _ in new]
    return Queue(version=queue.version, jobs=[*queue.jobs, *jobs], paused=queue.paused,
                 night=queue.night), jobs


DEFAULT_QUEUE = Path("queue")
