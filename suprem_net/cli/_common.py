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
