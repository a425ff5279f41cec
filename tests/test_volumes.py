"""3D CT volumes (BTCV, STS-3D): preprocessing ranges, slicing/restacking geometry, NIfTI output, foreground
rules, bad-input errors, and a short train -> infer -> evaluate run of the bundle on the demo volumes."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import parse_configs, run_bundle
from monai.transforms import Compose, Invertd, RepeatChanneld

from scripts.data import DatasetError
from scripts.tools.demo_data import _orient, make_ct_volume, save_volume
from scripts.volumes.cache import LoadCachedd, VolumeCacheDataset
from scripts.volumes.datalist import TRANSUNET8, make_datalist
from scripts.volumes.inference import SaveVolumed, VolumeInferer
from scripts.volumes.transforms import Foregroundd, volume_transforms

BTCV_WINDOW, STS_WINDOW = (-175, 250), (-100, 1100)


class FirstChannel:
    """An identity "model" as a 2D inferer: the slice's first channel."""

    def __call__(self, inputs, network=None):
        assert inputs.dim() == 4
        return inputs[:, :1].clone()


def btcv_item(root, case="0005"):
    return {
        "image": str(root / "btcv" / "img" / f"img{case}.nii.gz"),
        "label": str(root / "btcv" / "label" / f"label{case}.nii.gz"),
    }


def test_window_scale_and_three_channels(demo_volumes, tmp_path):
    item = btcv_item(demo_volumes)
    hu = nib.load(item["image"]).get_fdata()
    d = volume_transforms("btcv", BTCV_WINDOW, 64)(item)
    image, label = d["image"], d["label"]
    assert image.shape[:3] == (3, 64, 64) and label.shape == (1, *image.shape[1:])
    assert float(image.min()) == -1.0 and float(image.max()) == 1.0  # air and bone are clipped
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert set(label.unique().tolist()) <= {0.0, 1.0}
    # inside the window the scaling is linear: HU -> 2 (HU + 175) / 425 - 1, checked on a voxel mean
    flat = ((np.clip(hu, *BTCV_WINDOW) + 175) / 425 * 2 - 1).mean()
    assert abs(float(image[0].mean()) - flat) < 0.05
    # training slices come from the cache as (1, S, S) and become (3, S, S)
    ds = VolumeCacheDataset(
        [dict(item, name="img0005")],
        Compose([LoadCachedd(["image", "label"]), RepeatChanneld("image", 3)]),
        volume_transforms("btcv", BTCV_WINDOW, 64),
        str(tmp_path),
    )
    assert len(ds) == image.shape[-1]
    k = image.shape[-1] // 2
    s = ds[k]
    assert s["image"].shape == (3, 64, 64) and s["label"].shape == (1, 64, 64)
    assert torch.allclose(s["image"], image[..., k], atol=2e-3)  # float16 cache
    assert torch.equal(s["label"], label[..., k])


def test_volume_inferer_restacks_in_slice_order():
    x = torch.randn(2, 3, 16, 12, 7)
    out = VolumeInferer(FirstChannel(), batch_size=3)(x, None)
    assert torch.equal(out, x[:, :1])
    assert torch.equal(VolumeInferer(FirstChannel())(x[..., 0], None), x[:, :1, ..., 0])  # 2D passes through


@pytest.mark.parametrize(
    "shape,how", [((64, 64, 17), "none"), ((48, 48, 12), "flip"), ((64, 64, 9), "transpose"), ((48, 48, 21), "rotate")]
)
def test_slice_restack_invert_is_identity(tmp_path, shape, how):
    """Chain -> identity model on every axial slice -> restack -> Invertd: the input voxel for voxel, same affine."""
    rng = np.random.default_rng(sum(shape))
    hu, _ = make_ct_volume(rng, shape)
    affine = np.diag([-0.8, -0.75, 2.5, 1.0])
    affine[:3, 3] = [120, -30, 400]
    if how == "rotate":
        a = np.deg2rad(6)
        affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ affine[:3, :3]
    array, affine = _orient(hu, affine, how if how != "rotate" else "none")
    save_volume(tmp_path / "img0100.nii.gz", array, affine)
    pre = volume_transforms("btcv", BTCV_WINDOW, shape[0], resample_label=False)
    d = pre({"image": str(tmp_path / "img0100.nii.gz")})
    d["pred"] = VolumeInferer(FirstChannel(), batch_size=4)(d["image"][None], None)[0]
    out = Invertd("pred", pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    expected = (np.clip(array, *BTCV_WINDOW) + 175) / 425 * 2 - 1
    assert out.shape == (1, *array.shape)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-6)


@pytest.mark.parametrize(
    "dataset,name",
    [("btcv", "img0006"), ("btcv", "img0007"), ("btcv", "img0009"), ("sts3d", "sts3d_006"), ("sts3d", "sts3d_010")],
)
def test_written_nifti_has_the_inputs_geometry(demo_volumes, tmp_path, dataset, name):
    """Resized to 64 px and back: the written mask has the input's shape and affine (NIfTI, .mha and .nrrd inputs)."""
    window = BTCV_WINDOW if dataset == "btcv" else STS_WINDOW
    item = next(d for d in make_datalist(dataset, str(demo_volumes / dataset), "all") if d["name"] == name)
    pre = volume_transforms(dataset, window, 64, resample_label=False)
    d = pre(item)
    d["pred"] = (VolumeInferer(FirstChannel())(d["image"][None], None)[0] > 0).float()
    d = Invertd("pred", pre, orig_keys="image")(d)
    SaveVolumed("pred", str(tmp_path))(d)
    written = nib.load(tmp_path / f"{name}.nii.gz")
    label = nib.load(item["label"])
    assert written.shape == label.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, label.affine, atol=1e-4)
    if item["image"].endswith(".nii.gz"):
        src = nib.load(item["image"])
        assert (
            written.header["sform_code"] == src.header["sform_code"]
            and written.header["qform_code"] == src.header["qform_code"]
        )
        assert np.array_equal(written.affine, src.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1}


def test_btcv_all13_and_transunet8_differ_exactly_on_five_labels(demo_volumes):
    label = nib.load(btcv_item(demo_volumes)["label"])
    from monai.data import MetaTensor

    y = MetaTensor(torch.as_tensor(np.asarray(label.dataobj), dtype=torch.float32)[None])
    all13 = Foregroundd("label", "btcv", "all13")({"label": y})["label"]
    tu8 = Foregroundd("label", "btcv", "transunet8")({"label": y})["label"]
    dropped = set(range(1, 14)) - set(TRANSUNET8)
    assert dropped == {5, 9, 10, 12, 13} and all(bool((y == v).any()) for v in range(1, 14))
    assert torch.equal((all13 != tu8), torch.isin(y, torch.tensor(sorted(dropped), dtype=y.dtype)))
    assert torch.equal(tu8, torch.isin(y, torch.tensor(TRANSUNET8, dtype=y.dtype)).float())


def test_splits_are_fixed(demo_volumes):
    names = lambda ds, s: [d["name"] for d in make_datalist(ds, str(demo_volumes / ds), s)]  # noqa: E731
    assert names("btcv", "test") == ["img0001", "img0002"]  # the authors' test ids present in the demo
    assert names("btcv", "train") == ["img0005", "img0006", "img0007"] and names("btcv", "val") == ["img0009"]
    assert names("sts3d", "test") == ["sts3d_010", "sts3d_011", "sts3d_012"] and names("sts3d", "val") == ["sts3d_009"]
    assert len(names("sts3d", "train")) == 8


def _bad_dataset(tmp_path, problem: str):
    """A BTCV folder with one training case broken in one way."""
    root = tmp_path / problem
    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    for case in (5, 6):
        hu, label = make_ct_volume(rng, (32, 32, 8))
        img_path, lab_path = root / "img" / f"img{case:04d}.nii.gz", root / "label" / f"label{case:04d}.nii.gz"
        lab_affine = affine
        if case == 6 and problem == "4d":
            hu = np.stack([hu, hu], -1)
        elif case == 6 and problem == "shape":
            label = label[:, :, :-1]
        elif case == 6 and problem == "affine":
            lab_affine = np.diag([-0.8, -0.8, 3.0, 1.0])
        elif case == 6 and problem == "values":
            label[0, 0, 0] = 14
        elif case == 6 and problem == "nan":
            hu = hu.astype(np.float32)
            hu[3, 3, 3] = np.nan
        save_volume(img_path, hu, affine)
        save_volume(lab_path, label, lab_affine)
        if case == 6 and problem == "unreadable":
            lab_path.write_bytes(b"not a volume")
    return root, root / ("label" if problem in ("shape", "affine", "values", "unreadable") else "img") / (
        "label0006.nii.gz" if problem in ("shape", "affine", "values", "unreadable") else "img0006.nii.gz"
    )


@pytest.mark.parametrize(
    "problem,message",
    [
        ("4d", "expected a 3D volume"),
        ("shape", "label shape"),
        ("affine", "label affine differs"),
        ("values", "unexpected label values [14.0]"),
        ("nan", "NaN or infinite voxels"),
        ("unreadable", "cannot be read as a volume"),
    ],
)
def test_bad_input_fails_before_training_naming_the_file(tmp_path, problem, message):
    root, culprit = _bad_dataset(tmp_path, problem)
    with pytest.raises(DatasetError) as err:  # what train#dataset does when the trainer is built
        data = make_datalist("btcv", str(root), "all", val_fraction=0.0)
        VolumeCacheDataset(data, None, volume_transforms("btcv", BTCV_WINDOW, 32), str(tmp_path / "cache"))
    assert str(culprit) in str(err.value) and message in str(err.value)


def test_sts3d_label_values_and_skip_empty(demo_volumes, tmp_path):
    from monai.data import MetaTensor

    with pytest.raises(DatasetError, match="non-negative integers"):
        Foregroundd("label", "sts3d")({"label": MetaTensor(torch.tensor([[[[0.0, 0.5]]]]))})
    data = make_datalist("sts3d", str(demo_volumes / "sts3d"), "val")
    ds = VolumeCacheDataset(
        data, LoadCachedd(["image", "label"]), volume_transforms("sts3d", STS_WINDOW, 32), str(tmp_path), skip_empty=1.0
    )
    empty = [i for i, d in enumerate(ds.data) if not d["foreground"]]
    assert empty and ds.with_foreground
    assert all(bool(ds[i]["label"].any()) for i in empty)  # always redrawn among slices with teeth


# ---- the bundle, as users run it ------------------------------------------------------------------
AE = ["train.yaml", "train_autoencoder.yaml", "ct.yaml", "tiny.yaml"]
TRAIN = ["train.yaml", "ct.yaml", "tiny.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml"]
INFER = ["inference.yaml", "ct.yaml", "tiny.yaml"]


def test_short_3d_run_trains_infers_and_evaluates_per_volume(demo_volumes, tmp_path):
    root = tmp_path
    common = ["--bundle_root", str(root), "--dataset_dir", str(demo_volumes / "btcv")]
    run_bundle("training", AE, root, *common, "--autoencoder_max_iterations", "4", "--autoencoder_val_interval", "2")
    run_bundle("training", TRAIN, root, *common, "--max_iterations", "4", "--val_interval", "2", "--batch_size", "4")
    assert (root / "models" / "model.pt").is_file() and list((root / "data" / "cache").glob("*/meta.json"))
    proc = run_bundle("evaluate", EVAL, root, *common, "--save_score", "True")
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "name,dice,iou,hd95" and [r.split(",")[0] for r in rows[1:]] == [
        "img0001.nii.gz",
        "img0002.nii.gz",
    ]
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["dice"]["n"] == 2 and 0 <= summary["dice"]["mean"] <= 1 and "2 cases: dice" in proc.stdout
    for case in ("0001", "0002"):
        src = nib.load(demo_volumes / "btcv" / "img" / f"img{case}.nii.gz")
        for out in (
            root / "eval" / "masks" / f"img{case}.nii.gz",
            root / "eval" / "masks" / "scores" / f"img{case}.nii.gz",
        ):
            written = nib.load(out)
            assert written.shape == src.shape and np.array_equal(written.affine, src.affine)
    # STS-3D test volumes are .nrrd files: inference reads them and writes NIfTI masks on their grid
    out = root / "sts_masks"
    run_bundle(
        "inference",
        INFER,
        root,
        "--dataset",
        "sts3d",
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(demo_volumes / "sts3d"),
        "--output_dir",
        str(out),
    )
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sts3d_010.nii.gz", "sts3d_011.nii.gz", "sts3d_012.nii.gz"]
    assert (
        nib.load(out / "sts3d_010.nii.gz").shape
        == nib.load(demo_volumes / "sts3d" / "label" / "sts3d_010.nii.gz").shape
    )


@pytest.mark.parametrize("dataset, window", [("btcv", BTCV_WINDOW), ("sts3d", STS_WINDOW)])
def test_ct_overlay_picks_the_dataset_window(dataset, window):
    parser = parse_configs(["train.yaml", "ct.yaml", "tiny.yaml"], dataset=dataset)
    assert tuple(parser.get_parsed_content("hu_window")) == window


# ---- DICOM series --------------------------------------------------------------------------------
def write_dicom_series(folder, array, affine, uid="1.2.826.0.1.3680043.2.1125.12.1"):
    """A CT series as scanners write it: one int16 slice file per z, with its position, orientation and spacing."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.asarray(array, np.int16).transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    d = img.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        position = "\\".join(f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": orientation,
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(s)


@pytest.fixture(scope="module")
def dicom_twins(tmp_path_factory):
    """Two STS-3D-layout datasets with the same two CT cases: images as DICOM series folders, or as NIfTI."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(3)
    affine = np.diag([-0.8, -0.75, 2.5, 1.0])
    a = np.deg2rad(6)  # an oblique in-plane orientation, origin off zero
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = [120.0, -30.5, 400.0]
    for case in ("case01", "case02"):
        hu, label = make_ct_volume(rng, (40, 36, 10))
        hu = np.round(hu).astype(np.int16)
        for kind in ("dicom", "nifti"):
            image = root / kind / "image" / case
            write_dicom_series(image, hu, affine) if kind == "dicom" else save_volume(f"{image}.nii.gz", hu, affine)
            save_volume(root / kind / "label" / f"{case}.nii.gz", (label > 0).astype(np.uint8), affine)
    (root / "split.json").write_text('{"train": ["case02"], "test": ["case01"]}')
    return root


def test_dicom_series_reads_like_its_nifti_twin(dicom_twins, tmp_path):
    from scripts.volumes.reading import _geometry

    split = str(dicom_twins / "split.json")
    items = {k: make_datalist("sts3d", str(dicom_twins / k), "all", split_file=split) for k in ("dicom", "nifti")}
    assert [d["name"] for d in items["dicom"]] == [d["name"] for d in items["nifti"]] == ["case02", "case01"]
    dicom, nifti = items["dicom"][1], items["nifti"][1]
    shape, affine = _geometry(Path(dicom["image"]))
    assert shape == nib.load(nifti["image"]).shape == (40, 36, 10)
    np.testing.assert_allclose(affine, nib.load(nifti["image"]).affine, atol=1e-4)
    # training and inference see the same voxels (HU, orientation, labels) on the same grid
    for resample_label in (True, False):
        chain = volume_transforms("sts3d", STS_WINDOW, 32, resample_label=resample_label)
        a, b = chain(dict(dicom)), chain(dict(nifti))
        for key in ("image", "label"):
            assert torch.equal(a[key], b[key]), key
            np.testing.assert_allclose(a[key].affine.numpy(), b[key].affine.numpy(), atol=1e-4)
    cached = [
        VolumeCacheDataset(
            items[k], LoadCachedd(["image", "label"]), volume_transforms("sts3d", STS_WINDOW, 32), str(c)
        )
        for k, c in (("dicom", tmp_path / "c1"), ("nifti", tmp_path / "c2"))
    ]
    assert len(cached[0]) == len(cached[1]) == 20
    assert all(torch.equal(cached[0][i][k], cached[1][i][k]) for i in range(20) for k in ("image", "label"))


def test_dicom_series_evaluates_like_its_nifti_twin(dicom_twins):
    """The evaluate workflow (inference + ct overlays) on the DICOM set and on the NIfTI set, a random-weight model
    whose masks depend on the slice: the same masks (shape, affine, voxels) and the same metrics."""
    from conftest import input_dependent_tiny_sdseg

    root = dicom_twins / "bundle"
    (root / "models").mkdir(parents=True)
    model = input_dependent_tiny_sdseg(seed=0)
    torch.save({"model": model.state_dict()}, root / "models" / "model.pt")
    for kind in ("dicom", "nifti"):
        parse_configs(
            EVAL,
            bundle_root=str(root),
            dataset="sts3d",
            dataset_dir=str(dicom_twins / kind),
            split_file=str(dicom_twins / "split.json"),
            eval_dir=str(root / kind),
            device="$torch.device('cpu')",
        ).get_parsed_content("evaluate")
    rows = {k: (root / k / "metrics.csv").read_text().splitlines() for k in ("dicom", "nifti")}
    assert rows["dicom"][0] == "name,dice,iou,hd95" and [r.split(",")[0] for r in rows["dicom"][1:]] == ["case01"]
    assert rows["dicom"][1].split(",")[1:] == rows["nifti"][1].split(",")[1:]
    a, b = (nib.load(root / k / "masks" / "case01.nii.gz") for k in ("dicom", "nifti"))
    assert a.shape == b.shape == (40, 36, 10)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    mask = np.asarray(a.dataobj)
    assert np.array_equal(mask, np.asarray(b.dataobj))
    # the slices got different masks: "the same masks" would hold for a model that ignored its input
    assert 0 < mask.mean() < 1 and any((mask[..., k] != mask[..., 0]).mean() > 0.01 for k in range(1, mask.shape[-1]))


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing", "uneven slice spacing"),
        ("uneven", "uneven slice spacing"),
        ("junk", "IM0004.dcm is not a readable slice of the series"),
        ("truncated", "IM0004.dcm is not a readable slice of the series"),
        ("two_series", "2 DICOM series"),
    ],
)
def test_broken_dicom_series_stops_naming_the_folder(dicom_twins, tmp_path, problem, message):
    import shutil

    import SimpleITK as sitk

    root = tmp_path / "sts"
    shutil.copytree(dicom_twins / "dicom", root)
    folder = root / "image" / "case02"
    victim = folder / "IM0004.dcm"
    if problem == "missing":
        victim.unlink()
    elif problem == "junk":
        victim.write_bytes(b"not a DICOM file" * 64)
    elif problem == "truncated":
        victim.write_bytes(victim.read_bytes()[:-700])
    elif problem == "uneven":  # slice 4 sits 1 mm off the 2.5 mm grid
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(victim))
        s = reader.Execute()
        x, y, z = (float(v) for v in s.GetMetaData("0020|0032").split("\\"))
        s.SetMetaData("0020|0032", f"{x:.10g}\\{y:.10g}\\{z + 1:.10g}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(victim))
        writer.Execute(s)
    elif problem == "two_series":
        write_dicom_series(tmp_path / "other", np.zeros((40, 36, 2)), np.eye(4), uid="1.2.826.0.1.3680043.2.1125.12.2")
        for f in (tmp_path / "other").iterdir():
            shutil.move(f, folder / f"other_{f.name}")
    with pytest.raises(DatasetError) as err:
        make_datalist("sts3d", str(root), "all", split_file=str(dicom_twins / "split.json"))
    assert str(folder) in str(err.value) and message in str(err.value)


# ---- splits, names, empty labels, truncated files ----------------------------------------------------
def test_3d_split_files_and_names_are_checked(tmp_path):
    root, _ = _bad_dataset(tmp_path, "none")
    split = tmp_path / "split.json"
    for content, message in (
        ('["0005", "0006"]', "expected a JSON object"),
        ('{"train": "0005", "test": ["0006"]}', "'train' must be a list of names"),
        ('{"train": ["0005", "0006"], "test": ["0006"]}', "'0006' is in both 'train' and 'test'"),
        ('{"train": ["0005"], "test": ["0007"]}', "names not in"),
    ):
        split.write_text(content)
        with pytest.raises(DatasetError) as err:
            make_datalist("btcv", str(root), "test", split_file=str(split))
        assert str(err.value).startswith(f"{split}: ") and message in str(err.value), content
    (root / "img" / "img0005.mha").write_bytes(b"")  # the same case twice, as NIfTI and as .mha
    with pytest.raises(DatasetError, match=r"img: img0005.mha and img0005.nii.gz are both volume '0005'"):
        make_datalist("btcv", str(root), "all", val_fraction=0.0)


def test_training_labels_without_foreground_are_an_error(tmp_path):
    root, _ = _bad_dataset(tmp_path, "none")
    for case in (5, 6):
        path = root / "label" / f"label{case:04d}.nii.gz"
        img = nib.load(path)
        save_volume(path, np.zeros(img.shape, np.uint8), img.affine)
    data = make_datalist("btcv", str(root), "all", val_fraction=0.0)
    with pytest.raises(DatasetError, match=r"label: none of the 16 label slices has any foreground"):
        VolumeCacheDataset(data, None, volume_transforms("btcv", BTCV_WINDOW, 32), str(tmp_path / "cache"))


@pytest.mark.parametrize("which", ["image", "label"])
def test_truncated_volume_is_named_when_read(tmp_path, which):
    """A .nii.gz cut short passes the header check; reading its voxels (inference, evaluation) names it."""
    import traceback

    root, _ = _bad_dataset(tmp_path, "none")
    item = make_datalist("btcv", str(root), "all", val_fraction=0.0)[1]
    data = Path(item[which]).read_bytes()
    Path(item[which]).write_bytes(data[: len(data) // 2])
    item = make_datalist("btcv", str(root), "all", val_fraction=0.0)[1]  # the header check still passes
    with pytest.raises(Exception) as err:
        volume_transforms("btcv", BTCV_WINDOW, 32, resample_label=False)(item)
    text = "".join(traceback.format_exception(err.value))
    assert f"{item[which]}: cannot be read (EOFError" in text
