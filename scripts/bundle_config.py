"""The bundle's own configs, parsed from Python (benchmarks, tests): ``parse_configs(["train.yaml", "tiny.yaml"])``."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigParser

__all__ = ["ROOT", "CONFIGS", "parse_configs"]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def parse_configs(files: list[str], **overrides) -> ConfigParser:
    """The configs ``files`` (names under configs/, merged in order, later files win), ``bundle_root`` set to
    this bundle and then every ``overrides`` key set, as ``--key value`` does on the command line."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser["bundle_root"] = str(ROOT)
    for key, value in overrides.items():
        parser[key] = value
    return parser
