"""What every CLI shares: logging setup and turning user errors into one line + exit code 2."""
from __future__ import annotations

import errno
import functools
import logging
import sys

from suprem_net.errors import SupremError

# OSErrors the user's environment causes (full disk, no permission, a file where a folder should be):
# one line naming the path, like a SupremError; any other OSError is a bug and keeps its traceback
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                      errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def user_errors_exit_2(main):
    """Decorator: a ``SupremError`` (or an environment ``OSError``: full disk, no permission, ...)
    becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SupremError as e:
            for line in str(e).splitlines() or [type(e).__name__]:  # several problems: one line each
                print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """argparse type for a wall-clock duration: ``90`` or ``90s``, ``30m``, ``1.5h``, ``1h30m``; seconds."""
    import argparse
    import re

    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(min|h|m|s)", t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 90s, 30m, 1.5h or 1h30m")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be longer than 0 s")
    return seconds
