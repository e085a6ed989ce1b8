"""Helpers shared by the robustness tests: run a CLI in-process, check the one-line error, hash trees."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import tiny_net

DS = "Dataset901_SynthAbdomen"
TINY_NET = tiny_net((2, 4))


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty dict when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_under(folder: Path) -> list[str]:
    """Every file (not folder) under ``folder``, relative; [] when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def run_cli(main: Callable, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI ``main`` in-process; return ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one ``error: ...`` line on stderr that contains every needle."""
    # progress bars (tqdm, "...%|...") may precede the error on stderr; everything else may not
    lines = [ln for ln in err.replace("\r", "\n").strip().splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def no_partial_files(folder: Path) -> None:
    """No temporary ``.tmp-*`` file is left anywhere under ``folder``."""
    left = [p for p in Path(folder).rglob(".tmp-*")] if Path(folder).exists() else []
    if left:
        pytest.fail(f"temporary files left behind: {left}")
