"""Shared command-line plumbing: one-line errors with fixed exit statuses.

Exit statuses: 0 success, 2 bad input (config, data, CLI), 3 diverged training,
130 interrupted (Ctrl-C, or SIGTERM, which acts as Ctrl-C: :func:`sigterm_to_interrupt`).
No traceback is printed for any of these.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from mmssl.errors import ConfigError, DivergedError, MMSSLError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
             prog: str | None = None) -> int:
    """Run ``main(argv)`` and map the package's errors to one line on stderr and an exit status."""
    if prog is None:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "mmssl"
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    try:
        return int(main(argv) or 0)
    except DivergedError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except MMSSLError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


def sigterm_to_interrupt(signum, frame) -> None:
    """SIGTERM handler: do what Ctrl-C does (``kill PID``, a batch scheduler's stop).

    It calls the current SIGINT handler: Python's (KeyboardInterrupt: the commands clean
    up and say how to continue) or Ray Tune's while a search runs (Tune saves the
    experiment and returns). When SIGINT is ignored (a job started with ``cmd &`` in a
    script inherits that), it raises KeyboardInterrupt itself. Installed by
    :func:`run_main` and again by ``tune.runner.ray_session`` after ``ray.init`` (which
    sets its own). Source: Python ``signal`` docs.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that ``path`` can be (or already is) a writable folder, before any work starts.

    A missing folder is fine when its nearest existing ancestor is a writable folder
    (it is created later, parents included). Raises :class:`ConfigError` with one line
    naming the flag and the path when ``path`` or an ancestor is a file, or the folder
    cannot be written (probed by creating and removing a temporary file, so it holds for
    root and read-only file systems too). Returns ``Path(path)``.
    """
    out = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{flag}: empty path")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {out}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mmssl-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        what = "folder" if probe == out else f"folder {probe} (to create {out} in)"
        raise ConfigError(f"{flag} {out}: cannot write to the {what}: {e.strerror}") from None
    return out
