"""Runs that are killed, resumed and given wrong or damaged weight files (issue 12, items 3, 4, 8, 12)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_sdseg, tiny_parser
from ignite.engine import Engine, Events

from scripts.bundle_config import parse_configs
from scripts.handlers import AtomicCheckpointSaver
from scripts.io_utils import atomic_path
from scripts.weights.kl import load_autoencoder

TRAIN = ["train.yaml", "tiny.yaml"]


# ---- item 3: a kill during a save never leaves model.pt or the last checkpoint missing or truncated ---------
def _savers(folder: Path, net: torch.nn.Module, engine: Engine):
    """The bundle's two savers as train.yaml wires them: best model (model.pt) and the last state."""
    best = AtomicCheckpointSaver(
        save_dir=str(folder),
        save_dict={"model": net},
        save_key_metric=True,
        key_metric_name="dice",
        key_metric_filename="model.pt",
    )
    last = AtomicCheckpointSaver(
        save_dir=str(folder),
        save_dict={"network": net, "trainer": engine},
        file_prefix="sdseg",
        save_interval=1,
        n_saved=1,
    )
    return best, last


def _loadable(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


def _lost(folder: Path) -> list[str]:
    """What a kill at this moment would have cost: model.pt and the last checkpoint must exist and load."""
    lost = [] if _loadable(folder / "model.pt") else ["model.pt"]
    ckpts = sorted(folder.glob("sdseg_checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    if not ckpts or not _loadable(ckpts[-1]):
        lost.append("last checkpoint")
    return lost


def _epoch(engine: Engine, net: torch.nn.Module, best, last) -> None:
    """One validation epoch's saves: a better metric (model.pt replaced), then the last state (checkpoint)."""
    engine.state.epoch += 1
    engine.state.iteration += 1
    engine.state.metrics = {"dice": engine.state.epoch / 1e6}
    with torch.no_grad():
        net.weight.fill_(engine.state.epoch)
    best.metrics_completed(engine)
    last.interval_completed(engine)


class _Crash(Exception):
    pass


def test_a_crash_at_any_step_of_a_save_keeps_model_and_last_checkpoint(tmp_path, monkeypatch):
    """Every file-system step of a save (write, flush, rename, remove) fails in turn; the files stay complete."""
    net = torch.nn.Linear(8, 8)
    steps = {"calls": 0, "crash_at": 0}

    def failing(fn):
        def wrapped(*args, **kwargs):
            steps["calls"] += 1
            if steps["calls"] == steps["crash_at"]:
                raise _Crash(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    for module, name in ((torch, "save"), (os, "replace"), (os, "remove"), (os, "unlink"), (os, "fsync")):
        monkeypatch.setattr(module, name, failing(getattr(module, name)))
    monkeypatch.setattr(Path, "unlink", failing(Path.unlink))
    crash_at = 1
    while True:
        folder = tmp_path / str(crash_at)
        engine = Engine(lambda e, b: None)
        best, last = _savers(folder, net, engine)
        steps["crash_at"] = 0
        _epoch(engine, net, best, last)  # epoch 1 complete
        _epoch(engine, net, best, last)  # epoch 2 complete: the interval saver has something to replace
        steps.update(calls=0, crash_at=crash_at)
        try:
            _epoch(engine, net, best, last)
        except _Crash:
            assert _lost(folder) == [], f"crash at step {crash_at}"
            crash_at += 1
            continue
        break
    assert crash_at > 6  # the steps of both saves were each interrupted once
    assert torch.load(folder / "model.pt", weights_only=True)["weight"].max() == 3


def _save_forever(folder: Path) -> None:
    torch.set_num_threads(1)
    net = torch.nn.Linear(1024, 1024)  # 4 MB per file
    engine = Engine(lambda e, b: None)
    best, last = _savers(folder, net, engine)
    while True:
        _epoch(engine, net, best, last)


def test_random_kills_during_saves_lose_no_file(tmp_path):
    """SIGKILL a process that saves model.pt and checkpoints non-stop, at random moments, many times over."""
    folder = tmp_path / "models"
    rng = random.Random(0)
    kills, lost = 0, []
    deadline = time.monotonic() + 8
    while kills < 40 and time.monotonic() < deadline:
        pid = os.fork()
        if pid == 0:  # child
            try:
                _save_forever(folder)
            finally:
                os._exit(0)
        while not (folder / "model.pt").exists():  # the first complete files of the first child
            time.sleep(0.005)
        time.sleep(rng.uniform(0.02, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        lost += _lost(folder)
    print(f"{kills} kills, files lost: {len(lost)}")
    assert kills >= 10 and lost == []
    # the temporaries the killed savers left are removed when the next run's saver starts
    AtomicCheckpointSaver(save_dir=str(folder), save_dict={"model": torch.nn.Linear(1, 1)}, save_interval=1)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "tmp"))) == []


# ---- item 12: temporaries of killed writers (inference masks, tables) are removed by the next write -----------
def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    folder = tmp_path / "masks"
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_path(folder / "1.png") as tmp:
                tmp.write_bytes(b"half a png")
                time.sleep(60)
        finally:
            os._exit(0)
    while not any(folder.glob(".*")):
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert len(list(folder.glob(".*"))) == 1  # kill -9: the temporary stays behind
    with atomic_path(folder / "2.png") as tmp:  # the next run's first write into the folder
        live = list(folder.glob(".*"))  # its own temporary, in use: kept
        tmp.write_bytes(b"png")
    assert len(live) == 1 and not live[0].exists()
    assert sorted(p.name for p in folder.iterdir()) == ["2.png"]


# ---- item 4: resume = the uninterrupted run --------------------------------------------------------------
def _train(root: Path, demo_root: Path, resume: bool = False, crash_after: int | None = None, **overrides):
    """In-process `run training`: tiny preset, 8 iterations, validation every 2 (4 epochs), 4 batches per pass."""
    settings = dict(
        bundle_root=str(root),
        dataset="cvc",
        dataset_dir=str(demo_root / "cvc"),
        max_iterations=8,
        val_interval=2,
        batch_size=4,
        num_workers=0,
        resume=resume,
    )
    parser = parse_configs(TRAIN, **{**settings, **overrides})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    assert len(trainer.data_loader) == 4  # 18 training images: epoch 2 ends a pass, epoch 1 and 3 end mid-pass

    def crash(engine):
        if engine.state.epoch == crash_after:
            raise _Crash(f"killed after epoch {crash_after}")

    if crash_after:  # after the checkpoint of that epoch is written (handlers attached later fire later)
        trainer.add_event_handler(Events.STARTED, lambda e: e.add_event_handler(Events.EPOCH_COMPLETED, crash))
        with pytest.raises(RuntimeError) as error:  # MONAI wraps what the config expression raised
            parser.get_parsed_content("training")
        assert isinstance(error.value.__cause__, _Crash)
    else:
        parser.get_parsed_content("training")
    return parser


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


@pytest.fixture(scope="module")
def autoencoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "autoencoder.pt"
    torch.manual_seed(0)
    torch.save(tiny_parser().get_parsed_content("autoencoder_def").state_dict(), path)
    return path


def _bundle(tmp_path: Path, name: str, autoencoder_file: Path) -> Path:
    (tmp_path / name / "models").mkdir(parents=True)
    shutil.copy(autoencoder_file, tmp_path / name / "models" / "autoencoder.pt")
    return tmp_path / name


@pytest.fixture
def one_thread():
    """One intra-op thread: far faster on a shared, loaded CPU, and the same kernels for every run compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resumed_runs_equal_the_uninterrupted_run(tmp_path, demo_root, autoencoder_file, one_thread):
    """8 iterations in one go; killed after epoch 2 (end of a pass) and resumed; resumed from epoch 1 (mid-pass)
    because the newest checkpoint is truncated: the same weights, EMA, best model and best metric."""
    a = _bundle(tmp_path, "a", autoencoder_file)
    whole = _train(a, demo_root)
    b = _bundle(tmp_path, "b", autoencoder_file)
    _train(b, demo_root, crash_after=2)
    assert sorted(p.name for p in (b / "models").glob("sdseg_*")) == [
        "sdseg_checkpoint_epoch=1.pt",
        "sdseg_checkpoint_epoch=2.pt",
    ]
    c = tmp_path / "c"
    shutil.copytree(b, c)
    ckpt = c / "models" / "sdseg_checkpoint_epoch=2.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # damaged: --resume falls back to epoch 1

    d = tmp_path / "d"  # as if a validation before the kill had scored 0.99: no later one may replace model.pt
    shutil.copytree(b, d)
    ckpt = d / "models" / "sdseg_checkpoint_epoch=2.pt"
    state = torch.load(ckpt, weights_only=True)
    state["run_state"].update(best_metric=0.99, best_metric_epoch=2, best=[[0.99, "model.pt"]])
    torch.save(state, ckpt)
    best_model = (d / "models" / "model.pt").read_bytes()

    resumed = _train(b, demo_root, resume=True)
    kept_best = _train(d, demo_root, resume=True)
    assert (d / "models" / "model.pt").read_bytes() == best_model
    assert kept_best.get_parsed_content("validate#evaluator").state.best_metric == 0.99
    with pytest.warns(UserWarning, match=r"sdseg_checkpoint_epoch=2.pt: cannot be read .* truncated"):
        resumed_from_1 = _train(c, demo_root, resume=True)

    final = torch.load(a / "models" / "sdseg_checkpoint_epoch=4.pt", weights_only=True)
    for run, parser in (("b", resumed), ("c", resumed_from_1)):
        other = torch.load(tmp_path / run / "models" / "sdseg_checkpoint_epoch=4.pt", weights_only=True)
        assert other["trainer"]["iteration"] == 8
        for key in ("network", "ema"):
            _assert_same_state(final[key], other[key])
        _assert_same_state(
            torch.load(a / "models" / "model.pt", weights_only=True),
            torch.load(tmp_path / run / "models" / "model.pt", weights_only=True),
        )
        ours = whole.get_parsed_content("validate#evaluator").state
        theirs = parser.get_parsed_content("validate#evaluator").state
        assert (ours.best_metric, ours.best_metric_epoch) == (theirs.best_metric, theirs.best_metric_epoch)
        # keep_checkpoints (2): the resumed-from and the damaged checkpoints are gone
        assert sorted(p.name for p in (tmp_path / run / "models").glob("sdseg_*")) == [
            "sdseg_checkpoint_epoch=3.pt",
            "sdseg_checkpoint_epoch=4.pt",
        ]


# ---- item 8: weight files of another preset, damaged or of the wrong kind: a few lines naming file and fix ---
def _model_loader(ckpt_dir: Path, preset: str):
    """The model loader of `run inference` (its first handler), as configured for ``preset``."""
    parser = parse_configs(["inference.yaml", f"{preset}.yaml"], ckpt_dir=str(ckpt_dir), device="cpu")
    return parser.get_parsed_content("handlers")[0]


def _load_error(loader) -> str:
    with pytest.raises(Exception) as error:
        loader(Engine(lambda e, b: None))
    return str(error.value)


def test_model_of_another_preset_names_file_preset_and_fix(tmp_path, one_thread):
    model = tmp_path / "model.pt"
    torch.save(build_tiny_sdseg().state_dict(), model)
    message = _load_error(_model_loader(tmp_path, "small"))
    assert len(message.splitlines()) <= 5, message  # not the ~500 lines of load_state_dict
    assert message.startswith(f"{model}: the weights do not fit the configured network")
    assert (
        "looks like 'tiny' (configs/tiny.yaml)" in message and "configured as 'small' (configs/small.yaml)" in message
    )
    assert "Fix: end --config_file with 'configs/tiny.yaml'" in message


def test_model_with_other_condition_channels_names_the_switch(tmp_path, one_thread):
    model = tmp_path / "model.pt"
    torch.save(build_tiny_sdseg(condition_channels=16).state_dict(), model)
    message = _load_error(_model_loader(tmp_path, "tiny"))
    assert message.startswith(f"{model}: the weights do not fit the configured network")
    assert "takes 20 input channels (fusion 'concat', --condition_channels 16), the network 8" in message


def test_damaged_or_wrong_kind_of_model_file_is_named(tmp_path):
    model = tmp_path / "model.pt"
    torch.save(build_tiny_sdseg().state_dict(), model)
    model.write_bytes(model.read_bytes()[:100_000])  # an interrupted copy
    message = _load_error(_model_loader(tmp_path, "tiny"))
    assert message.startswith(f"{model}: cannot be read as PyTorch weights (100,000 bytes): the file is truncated")
    autoencoder = tiny_parser().get_parsed_content("autoencoder_def").state_dict()
    torch.save(autoencoder, model)  # autoencoder.pt copied as model.pt
    message = _load_error(_model_loader(tmp_path, "tiny"))
    assert message.startswith(f"{model}: the weights do not fit") and "a mask autoencoder file" in message
    torch.save({"network": {}, "ema": {}, "optimizer": {}, "trainer": {}}, model)  # a training checkpoint
    assert "It is a training checkpoint" in _load_error(_model_loader(tmp_path, "tiny"))


def test_sampler_draws_as_random_sampler_and_resumes_part_way():
    from scripts.run_state import ResumableRandomSampler

    data = list(range(10))
    torch.manual_seed(3)
    reference = [list(torch.utils.data.RandomSampler(data)) for _ in range(2)]
    torch.manual_seed(3)
    sampler = ResumableRandomSampler(data)
    assert [list(sampler) for _ in range(2)] == reference  # fresh runs shuffle exactly as before
    seed = sampler.seed
    sampler.resume(seed, 4)
    assert list(sampler) == reference[1][4:] and sampler.seed == seed


def test_autoencoder_with_or_without_nonlocal_attention_names_the_switch(tmp_path, one_thread):
    """A multi-class model.pt / autoencoder.pt trained before 0.7.0 has the autoencoder's non-local attention blocks,
    which multi-class --classes now leaves out: loading it says which switch to set, not a list of missing keys."""
    model = tmp_path / "model.pt"
    torch.save(build_tiny_sdseg(classes="all13", autoencoder_nonlocal_attn=True).state_dict(), model)
    parser = parse_configs(["inference.yaml", "tiny.yaml"], ckpt_dir=str(tmp_path), device="cpu", classes="all13")
    message = _load_error(parser.get_parsed_content("handlers")[0])
    assert message.startswith(f"{model}: the weights do not fit") and len(message.splitlines()) <= 3, message
    assert "set autoencoder_nonlocal_attn: True" in message
    ae_file = tmp_path / "autoencoder.pt"
    torch.save(tiny_parser(classes="all13").get_parsed_content("autoencoder_def").state_dict(), ae_file)
    with pytest.raises(ValueError, match="set autoencoder_nonlocal_attn: False"):
        load_autoencoder(tiny_parser().get_parsed_content("autoencoder_def"), ae_file)  # binary: attention
