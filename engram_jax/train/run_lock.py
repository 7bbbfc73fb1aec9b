"""One trainer per run directory: a lock file naming its holder, and replayed metric rows dropped.

`RunLock(workdir).acquire()` creates `workdir/run.lock` atomically (O_EXCL) holding
{"pid", "host", "started", "time"}. A second trainer is refused (`WorkdirLockedError`) with
the holder's pid and host. A lock left by a dead process on this host (SIGKILL, crash, a
reused pid with another start time) is stale: it is taken over with a warning. A lock held
from another host cannot be checked from here and is always refused (delete the file if
that process is gone). Plain files only: no flock, which NFS does not reliably provide.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the run directory."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux /proc), to tell reused pids apart."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # field 2 (comm) may hold spaces and parentheses: split after its closing ")"
  fields = stat[stat.rindex(")") + 2 :].split()
  return fields[19] if len(fields) > 19 else None


def _is_alive(pid: int, started: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  try:  # a killed child not yet reaped by its parent still answers kill(0)
    state = Path(f"/proc/{pid}/stat").read_text()
    if state[state.rindex(")") + 2 :].split()[0] in ("Z", "X"):
      return False
  except (OSError, ValueError):
    pass
  now = _start_time(pid)
  return started is None or now is None or now == started


class RunLock:
  """The lock of one run directory (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK_NAME
    self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
    self.held = False

  def holder(self) -> dict[str, Any] | None:
    """The lock file's record, {} if it is unreadable, None if there is none."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      return record if isinstance(record, dict) and "pid" in record else {}
    except ValueError:
      return {}

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLockedError naming the live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._refuse_or_clear()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump({**self.record, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
      self.held = True
      return
    raise WorkdirLockedError(f"could not take the lock {self.path}: other processes keep taking it")

  def _refuse_or_clear(self) -> None:
    holder = self.holder()
    if holder is None:  # released meanwhile
      return
    me = self.record["host"]
    if not holder:  # being written right now, or left empty by a crash while writing
      try:
        age = time.time() - self.path.stat().st_mtime
      except FileNotFoundError:
        return
      if age < 10:
        time.sleep(0.2)
        return
      log.warning("taking over the unreadable lock file %s (%.0f s old)", self.path, age)
    else:
      pid, host = int(holder["pid"]), str(holder.get("host"))
      if host != me:
        raise WorkdirLockedError(
          f"run directory {self.path.parent} is locked by pid {pid} on host {host!r} (lock file "
          f"{self.path}); another trainer may be using it. If that process is gone, delete the file"
        )
      if pid == os.getpid() or _is_alive(pid, holder.get("started")):
        raise WorkdirLockedError(
          f"run directory {self.path.parent} is in use by another trainer: pid {pid} on host {host!r} holds {self.path}"
        )
      log.warning(
        "taking over the stale lock %s of pid %d on host %r, which is no longer running", self.path, pid, host
      )
    # rename first: of two processes clearing the same stale lock only one succeeds
    aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    aside.unlink(missing_ok=True)

  def release(self) -> None:
    """Releases the workdir lock (removes run.lock) if this process holds it; idempotent."""
    if not self.held:
      return
    self.held = False
    holder = self.holder()
    if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def drop_metrics_after(workdir: str | os.PathLike, step: int) -> int:
  """Removes the rows of `workdir/metrics.jsonl` past `step` (steps about to be replayed).

  A run killed after writing metrics for steps its last checkpoint does not hold replays
  them on resume; without this they would appear twice. The file is replaced atomically.
  Returns the number of rows dropped.
  """
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    if not line.strip():
      continue
    try:
      row_step = json.loads(line).get("step")
    except ValueError:  # a row cut short by the kill: it belongs to a replayed step
      dropped += 1
      continue
    if isinstance(row_step, int) and row_step > step:
      dropped += 1
    else:
      kept.append(line)
  if dropped:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
  return dropped
