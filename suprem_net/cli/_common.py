"""What every CLI shares: logging setup and turning user errors into one line + exit code 2."""
from __future__ import annotations

import functools
import logging
import sys

from suprem_net.errors import SupremError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def user_errors_exit_2(main):
    """Decorator: a ``SupremError`` becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SupremError as e:
            for line in str(e).splitlines() or [type(e).__name__]:  # several problems: one line each
                print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
