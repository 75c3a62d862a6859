"""File-system checks made before long work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import ConfigError

__all__ = ["check_writable"]


def check_writable(path: Path, field: str) -> None:
    """Create the folder ``path`` goes in and check a file can be written there, or a one-line ConfigError:
    before a long run, not at its end."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, FileExistsError | NotADirectoryError) else exc.strerror
        raise ConfigError(f"{field} {path}: cannot write into the folder {folder} ({reason}); "
                          "choose a folder you can write to") from None
