"""Shared command-line plumbing: one-line errors with fixed exit statuses.

Exit statuses: 0 success, 2 bad input (config, data, CLI), 3 diverged training,
130 interrupted. No traceback is printed for any of these.
"""
from __future__ import annotations

import sys
from typing import Callable

from mmssl.errors import DivergedError, MMSSLError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
             prog: str | None = None) -> int:
    """Run ``main(argv)`` and map the package's errors to one line on stderr and an exit status."""
    if prog is None:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "mmssl"
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
