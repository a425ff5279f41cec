"""Model-zoo checks on the bundle's own files: ``large_files.yml`` and a ``metadata.json``.

    python -m scripts.tools.bundle_check            # checks ./large_files.yml; exit status 1 with the reason on error
    python -m scripts.tools.bundle_check --metadata configs/metadata_all13.json --classes all13   # and a metadata file

Each entry must have exactly the keys ``path``, ``url``, ``hash_val`` and ``hash_type`` (what
``python -m monai.bundle download_large_files`` reads), a relative ``path`` that stays inside the bundle,
an empty or http(s) ``url``, and a hash type MONAI knows when a hash is given.

A metadata file must validate against the zoo's schema (``--schema``, default the copy in ``tests/``), name its
input ``image`` and output ``pred``, give every tensor with a ``channel_def`` one name per channel (keys 0..n-1), and,
for a multi-class ``--classes`` (``python -m scripts.tools.metadata``), name the class set's classes: ``outputs.pred``
one channel per class with its name, ``label_classes`` and ``pred_classes`` every label value with its class.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

__all__ = ["LARGE_FILE_KEYS", "HASH_TYPES", "SCHEMA", "check_large_files", "check_metadata"]

LARGE_FILE_KEYS = ("path", "url", "hash_val", "hash_type")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # monai.apps.utils.check_hash
SCHEMA = Path(__file__).resolve().parents[2] / "tests" / "meta_schema_20240725.json"  # the zoo's, verbatim


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


def check_metadata(path: str | os.PathLike, classes: str = "binary", schema: str | os.PathLike = SCHEMA) -> dict:
    """Validate a metadata.json (module docstring); returns its content, raises ``ValueError`` naming the problem."""
    import jsonschema

    from scripts.classes import get_class_set
    from scripts.tools.metadata import class_text

    try:
        meta = json.loads(Path(path).read_text())
        jsonschema.validate(meta, json.loads(Path(schema).read_text()))
    except (OSError, ValueError, jsonschema.ValidationError) as e:
        raise ValueError(f"{path}: not valid metadata for the zoo's schema {schema}: {str(e)[:500]}") from e
    fmt = meta["network_data_format"]
    if list(fmt["inputs"]) != ["image"] or list(fmt["outputs"]) != ["pred"]:
        raise ValueError(f"{path}: network_data_format must have one input `image` and one output `pred`")
    for group in ("inputs", "outputs", "post_processed_outputs"):
        for name, tensor in fmt.get(group, {}).items():
            channels = tensor.get("channel_def") if isinstance(tensor, dict) else None
            if channels is not None and list(channels) != [str(i) for i in range(tensor["num_channels"])]:
                raise ValueError(
                    f"{path}: {group}.{name} has num_channels {tensor['num_channels']} but channel_def keys "
                    f"{list(channels)} (one name per channel, keys 0..n-1)"
                )
    class_set = get_class_set(classes)
    if class_set.binary:
        return meta
    if fmt["outputs"]["pred"]["channel_def"] != class_set.channel_def():
        raise ValueError(
            f"{path}: outputs.pred.channel_def {fmt['outputs']['pred']['channel_def']} is not --classes "
            f"{class_set.name}'s {class_set.channel_def()}"
        )
    for key in ("label_classes", "pred_classes"):
        if class_text(class_set) not in meta.get(key, ""):
            raise ValueError(
                f"{path}: {key} must list the label values of --classes {class_set.name}: " f"{class_text(class_set)}"
            )
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.bundle_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="large_files.yml", help="default: ./large_files.yml")
    parser.add_argument("--metadata", default=None, help="also check this metadata.json")
    parser.add_argument("--classes", default="binary", help="the class set the metadata must name (default: binary)")
    parser.add_argument("--schema", default=str(SCHEMA), help="the zoo's metadata schema (default: the copy in tests/)")
    args = parser.parse_args(argv)
    try:
        entries = check_large_files(args.path)
        meta = check_metadata(args.metadata, args.classes, args.schema) if args.metadata else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.path}: {len(entries)} entries, all inside the bundle")
    if meta is not None:
        channels = meta["network_data_format"]["outputs"]["pred"]["num_channels"]
        print(
            f"{args.metadata}: valid for the zoo's schema, {channels} output channel(s) named, --classes {args.classes}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
