"""The private Ray temp roots of local searches, and cleaning up after a killed driver.

A local search runs Ray in its own short temp root ``/tmp/mmssl-ray-XXXX`` (Unix socket
paths over ~100 bytes fail) holding ``driver.pid``. ``tune.runner.ray_session`` removes
it on exit, error and Ctrl-C. A driver killed with SIGKILL cannot: Ray's own processes
die with it (they share its fate), but the folder stays. :func:`clean_stale_temp_roots`,
called by ``tune.runner.init_ray`` before it starts Ray, removes such leftovers.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

TEMP_PREFIX = "mmssl-ray-"
TEMP_ROOT = "/tmp"
DRIVER_PID_FILE = "driver.pid"
# set by tune.runner.init_ray to the temp root before Ray starts: every Ray process of that
# run inherits it, including workers whose command line Ray rewrites (``ray::IDLE``)
ROOT_ENV = "MMSSL_RAY_ROOT"


def clean_stale_temp_roots(root: str = TEMP_ROOT) -> list[str]:
    """Remove the private Ray temp roots (``root/mmssl-ray-*``) whose driver is dead.

    A driver killed with SIGKILL cannot clean up: Ray's own processes die with it
    (they share its fate) but its temp root stays, and a straggler process may still
    hold it. A root is stale when its ``driver.pid`` names no live process (a root
    without the file is left alone: an older run or another tool). Processes whose
    command line names a stale root, whose environment has ``MMSSL_RAY_ROOT`` set to it
    (Ray workers, which rename themselves), or which hold a file below it open (Ray's
    dashboard and runtime-env agents: renamed, with an environment of their own, writing
    their logs there) are sent SIGKILL by PID, then the root is deleted.
    Linux (``/proc``); elsewhere only the folders are removed. Returns the removed roots.
    """
    removed = []
    for d in sorted(Path(root).glob(TEMP_PREFIX + "*")):
        try:
            pid = int((d / DRIVER_PID_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid):
            continue
        for proc in _pids_mentioning(str(d)):
            try:
                os.kill(proc, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pids_mentioning(text: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``text``, whose environment
    has ``MMSSL_RAY_ROOT=text``, or which hold a file below ``text`` open (Linux /proc)."""
    found, marker = [], f"{ROOT_ENV}={text}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            if (text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    or marker in (entry / "environ").read_bytes().split(b"\0")
                    or _holds_file_below(entry, text)):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return [p for p in found if p != os.getpid()]


def _holds_file_below(proc: Path, folder: str) -> bool:
    """Whether the process ``/proc/PID`` has a file below ``folder`` open."""
    prefix = folder.rstrip("/") + "/"
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False
