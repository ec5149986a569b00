"""The run directory: one place for everything a run writes.

    RUN_DIR/
      run.json                    supervisor's run record (atomic, rewritten on every change)
      run_id                      the run's id, created once
      config.yaml                 the config the run was started with (copy)
      COMPLETE                    marker: the run finished; resuming does nothing
      adapters/                   final adapters, mlx_lm layout (--adapter-path works)
      checkpoints/step-0000250/   one directory per checkpoint (see shared/checkpoint.py)
      checkpoints/quarantine/     invalid checkpoints moved aside by the supervisor, never deleted
      logs/worker.jsonl           worker structlog events (JSON lines)
      logs/supervisor.jsonl       supervisor structlog events (JSON lines)
      logs/worker-<attempt>.log   raw stdout/stderr of each worker attempt
      logs/metrics.jsonl          one line per optimizer step (loss, grad norm, lr, tok/s, memory)
      sock/                       mode 0700: ipc:// endpoints for telemetry and control (a deep
                                  run dir: /tmp/overnight-<uid>-<hash>/ instead; an existing
                                  one is used only if ours, 0700 and not a symlink)
      run.lock                    flock held by the process writing the run (shared/runlock.py)
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, RunDirError

CHECKPOINT_PREFIX = "step-"




@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def quarantine(self) -> Path:
        return self.checkpoints / "quarantine"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def worker_log(self) -> Path:
        return self.logs / "worker.jsonl"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.jsonl"

    @property
    def metrics_log(self) -> Path:
        return self.logs / "metrics.jsonl"

    def attempt_output(self, attempt: int) -> Path:
        return self.logs / f"worker-{attempt}.log"

    @property
    def record(self) -> Path:
        return self.root / "run.json"

    @property
    def config_copy(self) -> Path:
        return self.root / "config.yaml"

    @property
    def complete_marker(self) -> Path:
        return self.root / "COMPLETE"

    @property
    def sockets(self) -> Path:
        # A Unix socket path is limited to ~104 bytes (macOS) / 108 (Linux); deep run
        # directories get a private directory under the temp dir instead.
        inside = self.root.resolve() / "sock"
        if len(str(inside)) + len("/telemetry") < 100:
            return inside
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"overnight-{os.getuid()}-{digest}"

    @property
    def telemetry_endpoint(self) -> str:
        return f"ipc://{self.sockets / 'telemetry'}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.sockets / 'control'}"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:07d}"

    def create(self) -> None:
        """Make the run directory; RunDirError (one line naming the path) when it cannot be."""
        for d in (self.root, self.checkpoints, self.logs):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunDirError(cannot_create(self.root, e)) from None

    def create_socket_dir(self) -> None:
        """ipc:// sockets live in a directory only the user can enter: created with mode 0700,
        or, when it exists (the fallback under the shared temp dir may have been made by
        anyone), used only if it is a real directory (not a symlink), owned by this user,
        with mode 0700. RunDirError (one line naming the path and what is wrong) otherwise:
        another local user could otherwise pre-create it and read, answer or replace our
        sockets."""
        path = self.sockets
        try:
            if path.parent == self.root.resolve():  # RUN_DIR/sock (the temp dir exists)
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(cannot_create(path.parent, e)) from None
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask (0o700 & ~umask)
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise RunDirError(cannot_create(path, e, "socket directory")) from None
        problem = unsafe_directory(path)
        if problem is not None:
            raise RunDirError(f"{path}: refusing to use the socket directory: {problem}")

    def ensure_run_id(self, prefix: str) -> str:
        """The run's id, created once (RUN_DIR/run_id) and shared by supervisor and worker."""
        from shared.fsutil import atomic_write_bytes

        path = self.root / "run_id"
        if path.is_file():
            return path.read_text().strip()
        rid = f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        atomic_write_bytes(path, (rid + "\n").encode())
        return rid

    @property
    def looks_like_run(self) -> bool:
        """Something a run leaves is here (run.json, logs/, checkpoints/ or COMPLETE): what
        the commands that read a run (status, report, logs, checkpoints) ask of RUN_DIR."""
        return any((self.root / name).exists() for name in ("run.json", "logs", "checkpoints",
                                                            "COMPLETE"))

    @property
    def is_complete(self) -> bool:
        return self.complete_marker.exists()


def never_world_writable() -> int:
    """Add "others may not write" to this process's umask (inherited by its children);
    returns the umask now in effect. Files are created as the umask says (0o077 gives
    private run directories), but never writable by every local user, even under umask 0."""
    mask = os.umask(0)
    os.umask(mask | 0o002)
    return mask | 0o002


def unsafe_directory(path: Path) -> str | None:
    """Why an existing directory is not private to this user (None: it is): it must be a
    directory itself (lstat: a symlink is refused, wherever it points), owned by the
    effective uid, with mode 0700 exactly."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot inspect it ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        return f"its mode is {mode:04o}, expected 0700 (chmod 700 it, or remove it)"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def cannot_create(root: Path, error: OSError, what: str = "run directory") -> str:
    """The one line for a directory that mkdir refused: which path is in the way and why."""
    blocker = _nearest_existing(root)
    if not blocker.is_dir():
        why = f"{blocker} is a file, not a directory"
    else:
        why = f"{error.strerror or error} ({error.filename or blocker})"
    return f"{root}: cannot create the {what}: {why}"


def creation_problem(root: Path) -> str | None:
    """Why `root` could not be created or written, without creating anything (None: it can).
    The nearest existing ancestor must be a writable directory on a writable file system."""
    blocker = _nearest_existing(root)
    if not blocker.is_dir():
        why = f"{blocker} is a file, not a directory"
    elif os.statvfs(blocker).f_flag & os.ST_RDONLY:
        why = f"{blocker} is on a read-only file system"
    elif not os.access(blocker, os.W_OK | os.X_OK):
        why = f"{blocker} is not writable by this user"
    else:
        return None
    return f"{root}: cannot create the run directory: {why}"


def require_run(given: Path) -> None:
    """The check `status`, `report`, `logs`, `stop` and `checkpoints` make of a RUN_DIR given
    to them: ConfigError (one line, exit 78) when it is missing or holds nothing a run
    leaves (RunDir.looks_like_run)."""
    if not given.is_dir():
        raise ConfigError(f"{given}: no such run directory")
    if not RunDir(given).looks_like_run:
        raise ConfigError(f"{given}: not a run directory (expected run.json, logs/ or "
                          "checkpoints/ in it)")
