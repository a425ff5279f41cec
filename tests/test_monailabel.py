"""MONAI Label integration: the bundle served by MONAI Label's ``monaibundle`` sample app.

A copy of the bundle (tiny preset merged into its configs, the weights of the recipe-trained ``trained_bundle``,
whose masks depend on the image) goes under the app's ``model/`` folder; the real server (``monailabel
start_server``) runs on 127.0.0.1 on a demo studies folder, with the bundle source set to local and proxies pointing
nowhere, so it never goes online.
MONAI Label lives in its own environment, ``.venv-monailabel`` (requirements-monailabel.txt), which
this module builds when it is missing or out of date; it sees the main environment's torch and monai.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TrainedBundle
from monai.bundle import ConfigParser
from PIL import Image

ML_VENV = ROOT / ".venv-monailabel"
ML_REQUIREMENTS = ROOT / "requirements-monailabel.txt"
ML_PYTHON = ML_VENV / "bin" / "python"
MODEL = "sdseg"  # the bundle's folder name under <app>/model/
# the test bundle: tiny preset, and training short enough for a test (MONAI Label's "epoch" is val_interval iterations);
# a larger learning rate and a faster EMA than the recipe's, so that 8 iterations move the served (EMA) weights enough
# to change a mask; seed 1: the network the config initialises is not the one the served weights were trained from
# (trained_bundle: seed 0), as for any model trained elsewhere
TRAIN_OVERRIDES = {
    "seed": 1,
    "max_iterations": 8,
    "val_interval": 8,
    "batch_size": 2,
    "cache_rate": 0.0,
    "num_workers": 0,
    "learning_rate": 2.0e-3,
    "ema_decay": 0.9,
}
NO_INTERNET = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the test's own client: no proxy


# ---- the MONAI Label environment -------------------------------------------------------------------
def _venv_key(main_site: str) -> str:
    text = ML_REQUIREMENTS.read_bytes() + main_site.encode() + sys.version.encode()
    return hashlib.sha256(text).hexdigest()


def _run(cmd: list, what: str, timeout: int) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"MONAI Label could not be installed ({what} failed, exit {proc.returncode}); "
            f"environment {ML_VENV}, pins {ML_REQUIREMENTS.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return proc.stdout


def ensure_monailabel_venv() -> Path:
    """Build ``.venv-monailabel`` (pinned, ``--no-deps``) unless it is there for these pins and this main env."""
    main_site = sysconfig.get_paths()["purelib"]
    key = _venv_key(main_site)
    stamp = ML_VENV / "sdseg-venv.key"
    lock_path = (
        Path(tempfile.gettempdir()) / f"sdseg-monailabel-{hashlib.sha1(str(ML_VENV).encode()).hexdigest()[:8]}.lock"
    )
    with open(lock_path, "w") as lock:  # several test runs may share the checkout
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().strip() == key and ML_PYTHON.exists():
            return ML_PYTHON
        shutil.rmtree(ML_VENV, ignore_errors=True)
        _run([sys.executable, "-m", "venv", ML_VENV], "python -m venv", 300)
        site = _run([ML_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "venv", 60)
        # the main environment's packages (torch, monai, ...) come after the layer's own
        (Path(site.strip()) / "_sdseg_main_env.pth").write_text(main_site + "\n")
        pip = [ML_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
        _run([*pip, "-r", ML_REQUIREMENTS], f"pip install --no-deps -r {ML_REQUIREMENTS.name}", 1800)
        _run([ML_PYTHON, "-c", "import monailabel.app, itk.support.extras, torch, monai"], "import monailabel", 300)
        stamp.write_text(key + "\n")
    return ML_PYTHON


# ---- the app, the bundle copy, the studies ------------------------------------------------------------
def make_bundle_copy(dest: Path, trained: TrainedBundle) -> None:
    """The bundle with the tiny preset (and, for inference, the MONAI Label overlay configs/monailabel.yaml) merged
    into inference.yaml and train.yaml, ``trained``'s weights in models/."""
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("LICENSE", "README.md", "large_files.yml"):
        shutil.copy(ROOT / name, dest / name)
    for cfg, overlays, extra in (
        ("inference.yaml", ["monailabel.yaml"], {}),
        ("train.yaml", [], TRAIN_OVERRIDES),
    ):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / c) for c in (cfg, *overlays, "tiny.yaml")])
        for key, value in extra.items():
            parser[key] = value
        ConfigParser.export_config_file(parser.get(), str(dest / "configs" / cfg), fmt="yaml")
    (dest / "models").mkdir()
    state = torch.load(trained.root / "models" / "model.pt", weights_only=True)
    torch.save({"model": state}, dest / "models" / "model.pt")  # what CheckpointLoader reads
    shutil.copy(trained.root / "models" / "autoencoder.pt", dest / "models" / "autoencoder.pt")  # for training


def make_studies(demo_root: Path, dest: Path, n: int = 8) -> list[str]:
    """A MONAI Label local datastore: ``<id>.png`` images, 0/255 masks in ``labels/final/<id>.png``,
    and one unlabelled JPEG study ``k1.jpg`` (a Kvasir-style image)."""
    (dest / "labels" / "final").mkdir(parents=True)
    images = sorted((demo_root / "cvc" / "Original").glob("*.png"), key=lambda p: int(p.stem))[:n]
    for path in images:
        shutil.copy(path, dest / path.name)
        shutil.copy(demo_root / "cvc" / "Ground Truth" / path.name, dest / "labels" / "final" / path.name)
    shutil.copy(sorted((demo_root / "kvasir" / "images").glob("*.jpg"))[0], dest / "k1.jpg")
    return [p.stem for p in images]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, app: Path, studies: Path):
        self.proc, self.url, self.log, self.app, self.studies = proc, url, log, app, studies
        self.bundle = app / "model" / MODEL

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=300):
        """(status, content type, body bytes) of one HTTP request; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with LOCAL.open(req, timeout=timeout) as resp:
                return resp.status, resp.headers.get("content-type", ""), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("content-type", ""), e.read()

    def infer(self, image: str = "", params: dict | None = None, upload: tuple[str, bytes] | None = None):
        """POST /infer/<model>: a datastore image id, or a file upload (multipart, as MONAI Label's clients send)."""
        boundary = uuid.uuid4().hex
        field = f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        parts = [f"{field}{json.dumps(params or {})}\r\n".encode()]
        if upload:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{upload[0]}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode() + upload[1] + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        query = f"?output=image&image={image}" if image else "?output=image"
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request("POST", f"/infer/{MODEL}{query}", body, headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_root, trained_bundle):
    python = ensure_monailabel_venv()
    work = tmp_path_factory.mktemp("monailabel")
    app = work / "monaibundle"
    sample_app = ML_VENV / "monailabel" / "sample-apps" / "monaibundle"  # shipped in MONAI Label's wheel
    assert sample_app.is_dir(), f"{sample_app}: MONAI Label's monaibundle sample app is missing"
    shutil.copytree(sample_app, app)
    make_bundle_copy(app / "model" / MODEL, trained_bundle)
    make_studies(demo_root, work / "studies")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and "PROXY" not in k.upper()}
    env.update(NO_INTERNET)
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        MONAILABEL_PYEXE=str(python),
        OMP_NUM_THREADS="1",
        MONAI_LABEL_SESSION_PATH=str(work / "sessions"),
        MONAI_LABEL_TRACKING_ENABLED="false",
    )
    cmd = [
        *("monailabel", "start_server", "--app", app, "--studies", work / "studies"),
        *("--conf", "models", MODEL, "--conf", "zoo_source", "local", "--conf", "sam2", "false"),
        *("--host", "127.0.0.1", "--port", port),
    ]
    log = work / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    srv = Server(proc, f"http://127.0.0.1:{port}", log, app, work / "studies")
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{srv.log_tail()}", pytrace=False)
            try:
                if srv.request("GET", "/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label did not answer on {srv.url} within 180 s:\n{srv.log_tail()}", pytrace=False)
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:  # the server and the training process it may have started
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)


def bundle_inference(bundle: Path, image: Path, out: Path) -> np.ndarray:
    """The bundle's own inference workflow (inference.yaml and the tiny preset, without the MONAI Label overlay), in
    this process, on one image with ``bundle``'s weights: its 0/1 mask (H, W)."""
    (out / "in").mkdir(parents=True)
    shutil.copy(image, out / "in" / image.name)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.yaml"), str(ROOT / "configs" / "tiny.yaml")])
    for key, value in dict(
        bundle_root=str(bundle), input_dir=str(out / "in"), output_dir=str(out / "masks"), num_workers=0, device="cpu"
    ).items():
        parser[key] = value
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("inference")
    return np.asarray(Image.open(out / "masks" / f"{image.stem}.png")) // 255


# ---- the tests (in file order: training last, it replaces the weights) ----------------------------------
def test_app_lists_the_bundle(server):
    status, _, body = server.request("GET", "/info/")
    info = json.loads(body)
    assert status == 200 and MODEL in info["models"] and MODEL in info["trainers"]
    assert info["models"][MODEL]["type"] == "segmentation" and info["models"][MODEL]["dimension"] == 2


def http_mask(server, study: str) -> np.ndarray:
    status, ctype, body = server.infer(study, {"device": "cpu"})
    assert status == 200, f"{status}: {body[:500]!r}\n{server.log_tail()}"
    assert ctype.startswith("image/png")
    return np.asarray(Image.open(BytesIO(body)))


def dice_with_label(server, study: str, mask: np.ndarray) -> float:
    label = np.asarray(Image.open(server.studies / "labels" / "final" / f"{study}.png")) > 127
    return 2 * float((label & (mask > 0)).sum()) / float(label.sum() + (mask > 0).sum())


def test_inference_over_http_matches_the_bundle(server, tmp_path):
    image = server.studies / "1.png"
    label = http_mask(server, "1")
    width, height = Image.open(image).size
    assert label.shape == (height, width) and label.dtype == np.uint8  # the input's own size, 2D
    assert set(np.unique(label)) <= {0, 1}
    # two different images, different masks (a served model that dropped the image would give both the same one),
    # and the served model segments them
    other = http_mask(server, "2")
    assert other.shape == label.shape and (other != label).mean() > 0.01
    assert dice_with_label(server, "1", label) > 0.6 and dice_with_label(server, "2", other) > 0.6
    expected = bundle_inference(server.bundle, image, tmp_path)
    assert 0 < expected.sum() < expected.size  # not a constant mask: the comparison means something
    np.testing.assert_array_equal(label, expected)
    assert not (server.bundle / "eval").exists()  # MONAI Label writes the result; the bundle's mask writer is off


def test_jpeg_study_gets_a_png_label(server):
    # MONAI Label writes the label in the input's format unless asked: a JPEG label would not be binary
    status, ctype, body = server.infer("k1", {"device": "cpu", "result_extension": ".png"})
    assert status == 200 and ctype.startswith("image/png"), f"{status}: {body[:500]!r}"
    label = np.asarray(Image.open(BytesIO(body)))
    width, height = Image.open(server.studies / "k1.jpg").size
    assert label.shape == (height, width) and set(np.unique(label)) <= {0, 1}


def test_non_image_request_fails_clearly(server):
    status, _, body = server.infer(params={"device": "cpu"}, upload=("notes.png", b"this is not an image\n"))
    assert status >= 400, body[:300]  # never a label for a non-image
    reasons = ("cannot identify image file", "LoadImage cannot find a suitable reader")
    deadline = time.monotonic() + 30  # the server logs the traceback after it has answered
    while not all(r in server.log_tail(10**6) for r in reasons):
        assert time.monotonic() < deadline, f"no clear reason in the server log:\n{server.log_tail()}"
        time.sleep(0.5)
    assert server.request("GET", "/info/")[0] == 200  # and the server keeps serving
    assert server.infer("2", {"device": "cpu"})[0] == 200


def test_training_request_writes_a_checkpoint_and_the_trained_model_is_served(server, tmp_path):
    models = server.bundle / "models"
    before = (models / "model.pt").stat().st_mtime_ns
    served_before = http_mask(server, "3")
    params = {"max_epochs": 1, "val_split": 0.25, "multi_gpu": False, "device": "cpu"}
    status, _, body = server.request(
        "POST", f"/train/{MODEL}", json.dumps(params).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, f"{status}: {body[:500]!r}"
    deadline = time.monotonic() + 300
    while True:
        task = json.loads(server.request("GET", "/train/")[2])
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training did not finish within 300 s: {task}"
        time.sleep(2)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{task.get('status')}:\n{details}\n{server.log_tail()}"
    assert "Restored all variables from" in server.log_tail(10**6)  # MONAI Label's pretrained-weights loader ran
    assert (models / "sdseg_checkpoint_epoch=1.pt").is_file()  # the trainer state after MONAI Label's one epoch
    assert (models / "model.pt").stat().st_mtime_ns != before  # the best (EMA) weights, what inference serves
    served_after = http_mask(server, "3")  # the new weights are served: another mask, the bundle's with them
    assert set(np.unique(served_after)) <= {0, 1} and (served_after != served_before).any()
    np.testing.assert_array_equal(served_after, bundle_inference(server.bundle, server.studies / "3.png", tmp_path))
    # fine-tuned from the served weights (its EMA starts from them, not from the untrained network): still segments
    assert dice_with_label(server, "3", served_after) > 0.6, dice_with_label(server, "3", served_after)


def test_disc_cup_bundle_lists_optic_disc_and_cup_with_their_label_values(tmp_path):
    """A bundle copy set up as docs/monailabel.md says for ``--classes disc_cup`` (classes and dataset merged into the
    configs, ``scripts.tools.metadata`` writes its metadata.json): MONAI Label's ``BundleInferTask`` (what the
    monaibundle app serves, its ``info()`` what ``/info`` lists for the model) names optic disc and optic cup with the
    label values the bundle writes (1, 2). A plain copy lists the binary ``target`` only."""
    from conftest import build_tiny_sdseg

    from scripts.classes import get_class_set
    from scripts.tools.metadata import multiclass_metadata

    python = ensure_monailabel_venv()
    bundles = {}
    for classes in ("disc_cup", "binary"):
        dest = tmp_path / classes / MODEL
        dest.mkdir(parents=True)
        for name in ("configs", "scripts"):
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / c) for c in ("inference.yaml", "monailabel.yaml", "tiny.yaml")])
        if classes != "binary":
            parser["classes"], parser["dataset"] = classes, "refuge2"
        ConfigParser.export_config_file(parser.get(), str(dest / "configs" / "inference.yaml"), fmt="yaml")
        metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
        (dest / "configs" / "metadata.json").write_text(json.dumps(multiclass_metadata(metadata, classes), indent=4))
        (dest / "models").mkdir()
        torch.save({"model": build_tiny_sdseg(classes=classes).state_dict()}, dest / "models" / "model.pt")
        bundles[classes] = dest
    script = (
        "import json, sys\n"
        "from monailabel.tasks.infer.bundle import BundleInferTask\n"
        "task = BundleInferTask(sys.argv[1], {})\n"
        "print('INFO ' + json.dumps({'valid': task.is_valid(), **task.info()}, default=str))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    infos = {}
    for classes, dest in bundles.items():
        proc = subprocess.run(
            [str(python), "-c", script, str(dest)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("INFO ")]
        assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        infos[classes] = json.loads(lines[-1][5:])
    disc_cup = get_class_set("disc_cup")
    assert infos["disc_cup"]["valid"] and infos["disc_cup"]["labels"] == {"optic_disc": 1, "optic_cup": 2}
    assert dict(zip(disc_cup.organs, disc_cup.values[1:])) == infos["disc_cup"]["labels"]  # the written values
    assert infos["binary"]["labels"] == {"target": 0}  # as configs/metadata.json has it
