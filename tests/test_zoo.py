"""Model-zoo readiness: metadata schema, package pins, network I/O, large_files.yml, code format.

``tests/meta_schema_20240725.json`` is a verbatim copy of the schema the zoo downloads for
``configs/metadata.json`` (its ``schema`` field:
https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json,
md5 76e1add273836515d0bbb3bc71962474), kept here so that the check runs offline on a clean checkout.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from scripts.tools.bundle_check import LARGE_FILE_KEYS, check_large_files, check_metadata
from scripts.tools.bundle_check import main as bundle_check_main
from scripts.tools.metadata import main as metadata_main
from scripts.tools.metadata import multiclass_metadata

SCHEMA = ROOT / "tests" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
METADATA = ROOT / "configs" / "metadata.json"
EXACT = re.compile(r"^\d+(\.\d+)*$")  # a release version, nothing pip could resolve to something else


def metadata() -> dict:
    return json.loads(METADATA.read_text())


def requirement_pins(path=ROOT / "requirements.txt") -> dict[str, str]:
    """``{normalised name: version}`` of requirements.txt; every requirement must be an exact ``==`` pin."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;,]+)", line)
        assert m, f"{path.name}: {line!r} is not an exact pin (name==version)"
        pins[normalise(m.group(1))] = m.group(3)
    return pins


def normalise(name: str) -> str:
    """PEP 503 name normalisation: pillow == Pillow, scikit_image == scikit-image."""
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # black prints emoji: decode as UTF-8 whatever the locale (an ASCII locale made a passing check fail)
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout
    )


# ---- metadata.json ------------------------------------------------------------------------------
def test_metadata_validates_against_the_zoo_schema():
    """MONAI's own check, as ``python -m monai.bundle verify_metadata --meta_file configs/metadata.json
    --filepath tests/meta_schema_20240725.json``; the md5 makes sure the copy is the zoo's file."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(METADATA), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)  # raises ValueError if not


def test_the_schema_check_is_real(tmp_path):
    """The same check rejects metadata without a required key (so the test above can fail)."""
    from monai.bundle import verify_metadata

    bad = metadata()
    del bad["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)


def test_version_is_in_the_changelog_and_newest():
    meta = metadata()
    assert EXACT.match(meta["version"]), meta["version"]
    assert meta["version"] in meta["changelog"]
    versions = [tuple(int(p) for p in v.split(".")) for v in meta["changelog"]]
    assert max(versions) == tuple(int(p) for p in meta["version"].split("."))


def test_network_io_names_for_the_zoo_and_monai_label():
    fmt = metadata()["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    for tensor in (fmt["inputs"]["image"], fmt["outputs"]["pred"]):
        assert len(tensor["channel_def"]) == tensor["num_channels"]


def test_package_versions_match_requirements():
    """metadata.json's versions are requirements.txt's exact pins, both ways, monai/torch/numpy included."""
    meta, pins = metadata(), requirement_pins()
    assert meta["monai_version"] == pins.pop("monai")
    assert meta["pytorch_version"] == pins.pop("torch")
    assert meta["numpy_version"] == pins.pop("numpy")
    required = {normalise(k): v for k, v in meta["required_packages_version"].items()}
    assert all(EXACT.match(v) for v in required.values()), required
    different = sorted(k for k in required if k in pins and pins[k] != required[k])
    assert required == pins, (
        f"only in metadata.json: {sorted(set(required) - set(pins))}; only in requirements.txt: "
        f"{sorted(set(pins) - set(required))}; different versions: {different}"
    )


def test_pinned_versions_are_the_installed_ones():
    """pip installed exactly these versions into the environment the tests run in (CI: a fresh venv)."""
    for name, version in {**requirement_pins(), **requirement_pins(ROOT / "requirements-dev.txt")}.items():
        installed = importlib.metadata.version(name).split("+")[0]  # torch may carry a local tag (+cpu)
        assert installed == version, f"{name}: pinned {version}, installed {installed}"


# ---- multi-class metadata (python -m scripts.tools.metadata) --------------------------------------
# written out here, not read from scripts/classes.py: a wrong or missing class name or value there fails these tests
BTCV = "spleen kidney_right kidney_left gallbladder esophagus liver stomach aorta inferior_vena_cava".split()
BTCV += "portal_vein_and_splenic_vein pancreas adrenal_gland_right adrenal_gland_left".split()
CLASSES = {  # --classes: (class names in channel order, their label values)
    "all13": (["background", *BTCV], list(range(14))),
    "transunet8": (
        ["background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"],
        [0, 1, 2, 3, 4, 6, 7, 8, 11],
    ),
    "disc_cup": (["background", "optic_disc", "optic_cup"], [0, 1, 2]),
}


def write_metadata(tmp_path, classes: str) -> str:
    out = tmp_path / f"metadata_{classes}.json"
    metadata_main(["--classes", classes, "--base", str(METADATA), "--out", str(out)])
    return str(out)


@pytest.mark.parametrize("classes", sorted(CLASSES))
def test_multiclass_metadata_validates_and_names_every_class(tmp_path, classes, capsys):
    from monai.bundle import verify_metadata

    path = write_metadata(tmp_path, classes)
    verify_metadata(meta_file=path, filepath=str(SCHEMA), hash_val=SCHEMA_MD5)  # the zoo's check
    meta = check_metadata(path, classes)  # ours: channel_def and label values against the class set
    assert bundle_check_main(["--metadata", path, "--classes", classes]) == 0
    names, values = CLASSES[classes]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(names) and pred["channel_def"] == {str(i): n for i, n in enumerate(names)}
    labels = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert labels["num_channels"] == 1 and labels["value_range"] == [0, max(values)] and labels["format"] == "labels"
    for key in ("label_classes", "pred_classes"):  # what value 6 means
        assert ", ".join(f"{v} {n}" for v, n in zip(values, names)) in meta[key]
    assert "Multi-class" in meta["task"] and "eval_metrics" not in meta  # the binary figure is not claimed
    assert meta["version"] == metadata()["version"] and meta["changelog"] == metadata()["changelog"]


def test_binary_metadata_is_the_shipped_file_and_passes_the_check(tmp_path):
    assert multiclass_metadata(metadata(), "binary") == metadata()
    assert open(write_metadata(tmp_path, "binary"), "rb").read() == METADATA.read_bytes()  # regenerated identically
    assert check_metadata(METADATA)["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "target"}
    assert bundle_check_main([str(ROOT / "large_files.yml"), "--metadata", str(METADATA)]) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["network_data_format"]["outputs"]["pred"]["channel_def"].update({"6": "lung"}), "channel_def"),
        (lambda m: m["network_data_format"]["outputs"]["pred"]["channel_def"].pop("13"), "num_channels 14"),
        (lambda m: m.update(pred_classes=m["pred_classes"].replace("11 pancreas", "11 kidney")), "pred_classes"),
        (lambda m: m.update(label_classes="a binary mask"), "label_classes"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels="14"), "schema"),
    ],
    ids=["wrong name", "missing class", "wrong value", "no values", "not the schema"],
)
def test_metadata_check_catches_a_wrong_or_missing_class(tmp_path, change, message, capsys):
    path = write_metadata(tmp_path, "all13")
    meta = json.loads(open(path).read())
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=message):
        check_metadata(path, "all13")
    assert bundle_check_main(["--metadata", path, "--classes", "all13"]) == 1


def test_metadata_check_catches_another_class_set(tmp_path, capsys):
    with pytest.raises(ValueError, match="channel_def"):
        check_metadata(write_metadata(tmp_path, "transunet8"), "all13")
    with pytest.raises(ValueError, match="channel_def"):  # the binary file is no multi-class bundle's
        check_metadata(METADATA, "disc_cup")


# ---- network I/O --------------------------------------------------------------------------------
def test_verify_net_in_out_on_the_inference_network():
    """``python -m monai.bundle verify_net_in_out`` on inference.yaml's network_def (tiny preset for CPU)."""
    configs = str([str(ROOT / "configs" / "inference.yaml"), str(ROOT / "configs" / "tiny.yaml")])
    proc = run(
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(METADATA),
        "--config_file",
        configs,
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_verify_net_in_out_on_the_multiclass_network_and_its_metadata(tmp_path):
    """The generated all13 metadata's 14 output channels are what the --classes all13 network gives."""
    configs = str([str(ROOT / "configs" / "inference.yaml"), str(ROOT / "configs" / "tiny.yaml")])
    meta = write_metadata(tmp_path, "all13")
    verify = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", meta]
    proc = run(*verify, "--config_file", configs, "--device", "cpu", "--classes", "all13")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run(*verify, "--config_file", configs, "--device", "cpu", "--classes", "transunet8")  # 9 channels
    assert proc.returncode != 0 and "doesn't match: `14`" in proc.stdout + proc.stderr


# ---- large_files.yml ----------------------------------------------------------------------------
def test_large_files_lists_the_weights_inside_the_bundle():
    entries = check_large_files(ROOT / "large_files.yml")
    assert {"models/model.pt", "models/autoencoder.pt"} <= {e["path"] for e in entries}
    assert all(list(e) == list(LARGE_FILE_KEYS) for e in entries)


def write_large_files(tmp_path, **entry) -> str:
    item = {"path": "models/model.pt", "url": "", "hash_val": "", "hash_type": "", **entry}
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump({"large_files": [item]}))
    return str(tmp_path / "large_files.yml")


@pytest.mark.parametrize(
    "path", ["/etc/model.pt", "../model.pt", "models/../../model.pt", "..", "", "C:\\weights\\model.pt", "..\\m.pt"]
)
def test_large_files_entry_outside_the_bundle_is_a_clear_error(tmp_path, path):
    with pytest.raises(ValueError, match="outside the bundle"):
        check_large_files(write_large_files(tmp_path, path=path))


def test_large_files_symlink_out_of_the_bundle_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "models").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the bundle root"):
        check_large_files(write_large_files(tmp_path / "bundle"))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"md5": "x"}, "keys must be exactly"),
        ({"url": "ftp://host/model.pt"}, "http"),
        ({"hash_val": "abc"}, "both hash_val and hash_type"),
        ({"hash_val": "abc", "hash_type": "crc32"}, "hash_type must be one of"),
    ],
)
def test_large_files_bad_entries(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        check_large_files(write_large_files(tmp_path, **entry))


def test_large_files_command(tmp_path, capsys):
    assert bundle_check_main([str(ROOT / "large_files.yml")]) == 0
    assert bundle_check_main([write_large_files(tmp_path, path="../x.pt")]) == 1
    assert "outside the bundle" in capsys.readouterr().err


# ---- code format (the zoo's CI: black and isort at line length 120, flake8) --------------------------
@pytest.mark.parametrize(
    "tool",
    [
        ["black", "--check", "--line-length", "120", "scripts", "tests"],
        ["isort", "--check-only", "--diff", "--profile", "black", "--line-length", "120", "scripts", "tests"],
        ["flake8", "scripts", "tests"],
    ],
    ids=["black", "isort", "flake8"],
)
def test_code_format(tool):
    proc = run(sys.executable, "-m", *tool)
    assert proc.returncode == 0, f"{' '.join(tool)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
