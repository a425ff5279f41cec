"""``val_slices``: one labelled volume is enough, validation runs on a block of its axial slices held back from
training (docs/3d.md, "One labelled volume"). Generated volumes only."""

import math
import shutil
import traceback

import numpy as np
import pytest
import torch
from conftest import parse_configs
from ignite.engine import Events

from scripts.data import DatasetError
from scripts.volumes.cache import LoadCachedd, VolumeCacheDataset
from scripts.volumes.datalist import make_datalist
from scripts.volumes.transforms import volume_transforms

AE = ["train.yaml", "train_autoencoder.yaml", "ct.yaml", "tiny.yaml"]
CHAIN = volume_transforms("btcv", (-175, 250), 32)


@pytest.fixture
def one_scan(demo_volumes, tmp_path):
    """A BTCV folder holding one labelled volume (0005, not a test id), and its depth in axial slices."""
    for kind, prefix in (("img", "img"), ("label", "label")):
        (tmp_path / "one" / kind).mkdir(parents=True)
        shutil.copy(demo_volumes / "btcv" / kind / f"{prefix}0005.nii.gz", tmp_path / "one" / kind)
    root = tmp_path / "one"
    depth = len(VolumeCacheDataset(make_datalist("btcv", str(root), "all"), None, CHAIN, str(tmp_path / "c")))
    return root, depth


def datasets(root, cache, val_slices, **kw):
    load = LoadCachedd(["image", "label"])
    train = VolumeCacheDataset(
        make_datalist("btcv", str(root), "train", val_slices=val_slices, **kw), load, CHAIN, cache
    )
    val = make_datalist("btcv", str(root), "val", val_slices=val_slices, **kw)
    return train, VolumeCacheDataset(val, load, CHAIN, cache, slices=False)


@pytest.mark.parametrize("spec", [[3, 8], 0.25])
def test_training_never_sees_the_held_back_slices(one_scan, tmp_path, spec):
    root, depth = one_scan
    start, stop = spec if isinstance(spec, list) else (depth - math.ceil(0.25 * depth), depth)
    train, val = datasets(root, str(tmp_path / "cache"), spec)
    assert [d["name"] for d in train.data] == ["img0005"] * (depth - (stop - start))
    assert {d["slice"] for d in train.data} == set(range(depth)) - set(range(start, stop))
    assert len(val) == 1 and val.data[0]["name"] == f"img0005[{start}:{stop}]"
    block = val[0]["image"][0]  # (S, S, stop - start)
    cached = np.load(val.data[0]["image"])
    assert block.shape[-1] == stop - start and np.array_equal(block.numpy(), np.moveaxis(cached[start:stop], 0, -1))
    for i in range(len(train)):  # by content too: no training slice is one of the block's
        s = train[i]["image"][0]
        assert not any(torch.equal(s, block[..., k]) for k in range(block.shape[-1]))


def test_validation_evaluates_the_block_as_one_volume(one_scan, tmp_path):
    """The bundle's validation (autoencoder stage, no weights needed) runs once per held-back block."""
    root, depth = one_scan
    parser = parse_configs(AE, dataset_dir=str(root), val_slices=[2, 9], cache_dir=str(tmp_path / "cache"))
    parser["bundle_root"] = str(tmp_path)
    train = parser.get_parsed_content("train#dataset")
    assert len(train) == depth - 7
    evaluator = parser.get_parsed_content("validate#evaluator")
    seen = []
    evaluator.add_event_handler(  # the batch, decollated: one item per volume
        Events.ITERATION_COMPLETED, lambda e: seen.append([(b["name"], tuple(b["label"].shape)) for b in e.state.batch])
    )
    evaluator.run()
    assert seen == [[("img0005[2:9]", (1, 64, 64, 7))]]
    assert 0 <= evaluator.state.metrics["val_mean_dice"] <= 1


@pytest.mark.parametrize(
    "spec, message",
    [
        (1.5, "val_slices=1.5: expected a fraction 0 < f < 1"),
        ([8, 3], "val_slices=[8, 3]: expected"),
        ([-4, 2], "val_slices=[-4, 2]: expected"),
        ("30:40", "val_slices='30:40': expected"),
        (True, "val_slices=True: expected"),
        ([3, 500], "img0005.nii.gz: val_slices [3, 500) does not fit its {depth} axial slices"),
        ([0, 500], "img0005.nii.gz: val_slices [0, 500) does not fit"),
        ("all", "img0005.nii.gz: val_slices [0, {depth}] holds back all {depth} axial slices"),
    ],
)
def test_bad_block_spec_fails_naming_the_problem(one_scan, tmp_path, spec, message):
    root, depth = one_scan
    spec = [0, depth] if spec == "all" else spec
    with pytest.raises(DatasetError) as err:
        datasets(root, str(tmp_path / "cache"), spec)
    assert message.format(depth=depth) in str(err.value)


def test_val_slices_conflicts_are_named(one_scan, tmp_path):
    root, _ = one_scan
    split = tmp_path / "split.json"
    split.write_text('{"train": ["0005"], "val": ["0005"]}')  # what users try first
    with pytest.raises(DatasetError, match="'0005' is in both 'train' and 'val'"):
        make_datalist("btcv", str(root), "val", split_file=str(split))
    split.write_text('{"train": [], "val": ["0005"]}')
    with pytest.raises(DatasetError, match=r"split.json: lists 'val' volumes, and val_slices=\[3, 8\]"):
        make_datalist("btcv", str(root), "val", split_file=str(split), val_slices=[3, 8])
    split.write_text('{"train": ["0005"]}')  # a split file without "val": fine
    assert [d["val_slices"] for d in make_datalist("btcv", str(root), "val", split_file=str(split), val_slices=0.2)]
    with pytest.raises(DatasetError, match="evaluate the test split"):  # evaluation reads whole volumes
        make_datalist("btcv", str(root), "val", val_slices=[3, 8], whole_volumes=True)
    parser = parse_configs(["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml"], dataset_dir=str(root))
    parser["eval_split"], parser["val_slices"] = "val", [3, 8]
    with pytest.raises(Exception) as err:  # MONAI wraps it; the cause is ours
        parser.get_parsed_content("datalist")
    assert "evaluate the test split" in "".join(traceback.format_exception(err.value))


def test_off_by_default_and_unchanged(demo_volumes, one_scan, tmp_path):
    root, depth = one_scan
    assert parse_configs(AE)["val_slices"] is None  # ct.yaml: off
    btcv = str(demo_volumes / "btcv")
    for split in ("train", "val", "test", "all"):
        assert make_datalist("btcv", btcv, split, val_slices=None) == make_datalist("btcv", btcv, split)
    train, val = datasets(demo_volumes / "btcv", str(tmp_path / "cache"), None)
    assert {d["name"] for d in train.data} == {"img0005", "img0006", "img0007"}
    assert [d["name"] for d in val.data] == ["img0009"] and "block" not in val.data[0]
    with pytest.raises(DatasetError, match="the 'val' split is empty"):  # one scan without the option, as before
        make_datalist("btcv", str(root), "val", val_slices=None)
