"""Model-zoo checks on the bundle's own files: ``large_files.yml``.

    python -m scripts.tools.bundle_check            # checks ./large_files.yml; exit status 1 with the reason on error

Each entry must have exactly the keys ``path``, ``url``, ``hash_val`` and ``hash_type`` (what
``python -m monai.bundle download_large_files`` reads), a relative ``path`` that stays inside the bundle,
an empty or http(s) ``url``, and a hash type MONAI knows when a hash is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

__all__ = ["LARGE_FILE_KEYS", "HASH_TYPES", "check_large_files"]

LARGE_FILE_KEYS = ("path", "url", "hash_val", "hash_type")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # monai.apps.utils.check_hash


def _inside(path: str) -> bool:
    """True when ``path`` is relative and does not climb out of its root (no absolute path, drive or ``..``)."""
    if (
        not path
        or PurePosixPath(path).is_absolute()
        or PureWindowsPath(path).is_absolute()
        or PureWindowsPath(path).drive
    ):
        return False
    depth = 0
    for part in PurePosixPath(path.replace("\\", "/")).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return depth > 0


def check_large_files(path: str | os.PathLike = "large_files.yml") -> list[dict]:
    """Validate a ``large_files.yml``; returns its entries, raises ``ValueError`` naming the bad entry.

    A symlinked folder inside the bundle that points elsewhere is also refused (the resolved target must stay
    inside the bundle, as MONAI's ``download_large_files`` requires).
    """
    path = Path(path)
    root = path.resolve().parent
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read it as YAML: {e}") from e
    if not isinstance(content, dict) or set(content) != {"large_files"} or not isinstance(content["large_files"], list):
        raise ValueError(f"{path}: expected one top-level key `large_files` holding a list of entries")
    seen = set()
    for i, entry in enumerate(content["large_files"]):
        where = f"{path}: large_files entry {i}"
        if not isinstance(entry, dict) or set(entry) != set(LARGE_FILE_KEYS):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where}: keys must be exactly {', '.join(LARGE_FILE_KEYS)}; got {keys}")
        if not all(isinstance(entry[k], str) for k in LARGE_FILE_KEYS):
            raise ValueError(f'{where}: every value must be a string (use "" for none)')
        file = entry["path"]
        where = f"{path}: large_files entry {i} ({file!r})"
        if not _inside(file):
            raise ValueError(
                f"{where}: path points outside the bundle; it must be a file path relative to the bundle root "
                f"({root}), without '..' or a leading '/', e.g. models/model.pt"
            )
        target = (root / file).resolve()
        if os.path.commonpath([root, target]) != str(root):
            raise ValueError(f"{where}: path resolves to {target}, outside the bundle root {root} (a symlink?)")
        if file in seen:
            raise ValueError(f"{where}: listed twice")
        seen.add(file)
        url = entry["url"]
        if url and not url.startswith(("https://", "http://")):
            raise ValueError(f"{where}: url must be empty or an http(s) address, got {url!r}")
        hash_val, hash_type = entry["hash_val"], entry["hash_type"]
        if bool(hash_val) != bool(hash_type):
            raise ValueError(f"{where}: give both hash_val and hash_type, or neither")
        if hash_type and hash_type.lower() not in HASH_TYPES:
            raise ValueError(f"{where}: hash_type must be one of {', '.join(HASH_TYPES)}, got {hash_type!r}")
    return content["large_files"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.bundle_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="large_files.yml", help="default: ./large_files.yml")
    path = parser.parse_args(argv).path
    try:
        entries = check_large_files(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path}: {len(entries)} entries, all inside the bundle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
