"""The digest of an adapter artifact, as pinned in a ModelVersion's `spec.adapter.digest`.

    sha256 over, for each file in order of its relative POSIX path (compared as UTF-8 bytes):
        path (UTF-8) + NUL + size in bytes (decimal ASCII) + NUL + content

written as "sha256:<64 hex>". A single file is hashed the same way, its path being its own name. Files and
directories whose name starts with "." are skipped (download tools keep their own state there, such as
`.cache/huggingface/` or `.git/`), as is anything that is not a regular file; symbolic links to files are
followed, links to directories are not descended into.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def _files(root: Path) -> list[tuple[bytes, Path]]:
    found: list[tuple[bytes, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath, filename)
            if not path.is_file():
                continue
            found.append((path.relative_to(root).as_posix().encode(), path))
    found.sort(key=lambda item: item[0])
    return found


def directory_digest(path: str | os.PathLike[str]) -> str:
    """Digest of the adapter at `path` (a directory, or a single file). Raises FileNotFoundError if it does
    not exist and ValueError if a directory holds no file to hash."""
    root = Path(path)
    if root.is_file():
        files = [(root.name.encode(), root)]
    elif root.is_dir():
        files = _files(root)
        if not files:
            raise ValueError(f"{root}: no files to hash")
    else:
        raise FileNotFoundError(f"{root}: no such file or directory")
    digest = hashlib.sha256()
    for rel, file in files:
        with file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(rel + b"\0" + str(size).encode() + b"\0")
            remaining = size
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                remaining -= len(chunk)
        if remaining != 0:
            raise OSError(f"{file} changed size while it was hashed")
    return "sha256:" + digest.hexdigest()
