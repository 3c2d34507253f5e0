"""Files of generated secrets in ``data_dir``, created once even when several nodes start together.

The content is written to a private temporary file first and then linked into place, which fails if
the name exists: whoever links first wins, everyone else reads the winner's complete file. A reader can
never see a file that is still being written.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_once(path: Path, content: bytes) -> bytes:
    """``path``'s content: the existing one, else ``content`` (written atomically, mode 0600)."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_bytes()
        return content
    finally:
        temporary.unlink(missing_ok=True)
