"""What is wrong with a file a command was told to read, in the user's words."""

from __future__ import annotations

from pathlib import Path


def unreadable(path: Path) -> str:
    """Why ``path`` is not a file to read ("" when it is one): a directory or a
    device such as /dev/null exists, and "no such file" would send the user
    looking for one."""
    if path.is_file():
        return ""
    return "not a regular file" if path.exists() else "no such file"
