"""The package version (single source: pyproject reads ``__version__`` from here) and the git commit.

Light on purpose (no torch): ``synqt --version`` and every ``metrics.json`` use it.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent
# The folder holding the synqt/ and launcher/ packages: a checkout's root, or site-packages for a wheel.
# Ray workers get it on PYTHONPATH; `synqt gpu-check` looks for the checkout's tests/ there.
PACKAGES_ROOT = _PACKAGE_DIR.parent


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes to tracked files) of the checkout this package runs from.

    Only when the package is the ``synqt/`` folder at the top of a git work tree (a checkout, editable
    or via PYTHONPATH); an installed wheel gives (None, None) even inside someone else's repository,
    whose commit would say nothing about this code.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True,
                                 timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != _PACKAGE_DIR.parent:
        return None, None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit or None, (bool(status) if status is not None else None)


def version_string() -> str:
    """``0.1.0`` or ``0.1.0 (git 1a2b3c4d5e6f, uncommitted changes)`` in a checkout."""
    commit, dirty = git_state()
    if commit is None:
        return __version__
    return f"{__version__} (git {commit[:12]}{', uncommitted changes' if dirty else ''})"
