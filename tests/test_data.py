"""Dataset layouts, splits, mask rules and bad input, on generated demo data."""

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_parser
from PIL import Image

from scripts.data import DatasetError, make_datalist, mask_to_target, split_names, to_rgb


@pytest.mark.parametrize("dataset", ["cvc", "kvasir", "refuge2"])
def test_loader_reads_demo_layout(demo_root, dataset):
    parser = tiny_parser(dataset=dataset, dataset_dir=str(demo_root / dataset), num_workers=0)
    ds = parser.get_parsed_content("validate#dataset")
    assert len(ds) >= 1
    for item in (ds[i] for i in range(len(ds))):
        image, label = item["image"], item["label"]
        assert image.shape == (3, 64, 64) and label.shape == (1, 64, 64)
        assert image.dtype == torch.float32 and -1.0 <= float(image.min()) < float(image.max()) <= 1.0
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
        assert 0 < float(label.mean()) < 0.9  # a target is present, not everything


def test_training_transforms_flip_image_and_mask_together(demo_root):
    parser = tiny_parser(dataset="cvc", dataset_dir=str(demo_root / "cvc"), num_workers=0)
    ds = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#preprocessing")
    item = ds.data[0]
    plain = val(dict(item))
    seen = set()
    for seed in range(12):
        ds.transform.set_random_state(seed)
        out = ds.transform(dict(item))
        flips = []
        for dims in ((), (1,), (2,), (1, 2)):
            ref_img = plain["image"].flip(dims) if dims else plain["image"]
            ref_lab = plain["label"].flip(dims) if dims else plain["label"]
            if torch.allclose(out["image"], ref_img) and torch.equal(out["label"], ref_lab):
                flips.append(dims)
        assert len(flips) >= 1, "image and mask must be flipped together"
        seen.add(flips[0])
    assert len(seen) >= 3  # horizontal and vertical flips both happen


def test_refuge_mask_rules():
    disc_map = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)  # original release: 0 cup
    assert mask_to_target(disc_map, "refuge_cup").tolist() == [[[1.0, 0.0, 0.0]]]
    rgb = torch.zeros(3, 1, 3, dtype=torch.uint8)
    rgb[1, 0, 1] = 255  # processed release: cup where G == 255
    assert mask_to_target(rgb, "refuge_cup").tolist() == [[[0.0, 1.0, 0.0]]]
    gray_as_rgb = disc_map.expand(3, -1, -1)
    assert mask_to_target(gray_as_rgb, "refuge_cup").tolist() == [[[1.0, 0.0, 0.0]]]
    jpeg_like = torch.tensor([[[120, 135, 250, 3]]], dtype=torch.uint8)
    assert mask_to_target(jpeg_like, "gray").tolist() == [[[0.0, 1.0, 1.0, 0.0]]]
    label_map = torch.tensor([[[0, 1, 1, 0]]], dtype=torch.uint8)  # 0/1, as MONAI Label saves labels
    assert mask_to_target(label_map, "gray").tolist() == [[[0.0, 1.0, 1.0, 0.0]]]


def test_splits_are_deterministic_and_match_the_paper_counts():
    cvc = [str(i) for i in range(1, 613)]
    s = split_names("cvc", list(reversed(cvc)))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (488, 62, 62)
    assert s["test"][0] == "551" and s["train"][:3] == ["1", "2", "3"]  # numeric order, not "1, 10, 100"
    assert split_names("cvc", cvc) == s
    kv = split_names("kvasir", [f"id{i:04d}" for i in range(1000)])
    assert (len(kv["train"]), len(kv["val"]), len(kv["test"])) == (800, 100, 100)
    # REFUGE2 as released: 40 glaucoma g*, 360 normal n*, 400 V* (REFUGE validation), 400 T* (test)
    refuge = [f"{p}{i:04d}" for p, n in (("g", 40), ("n", 360), ("V", 400), ("T", 400)) for i in range(1, n + 1)]
    ref = split_names("refuge2", refuge[::-1])
    assert len(ref["test"]) == 400 and all(n.startswith("T") for n in ref["test"])
    assert (len(ref["train"]), len(ref["val"])) == (720, 80) and not set(ref["train"]) & set(ref["val"])
    assert [sum(n.startswith(p) for n in ref["val"]) for p in "gnV"] == [4, 36, 40]  # 10 % of each group
    assert split_names("refuge2", refuge) == ref


def test_split_file_overrides_rule(demo_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text('{"train": ["1", "2"], "val": ["3"], "test": ["4"]}')
    items = make_datalist("cvc", str(demo_root / "cvc"), "train", split_file=str(split))
    assert [d["name"] for d in items] == ["1", "2"]
    split.write_text('{"train": ["nope"]}')
    with pytest.raises(DatasetError, match="nope"):
        make_datalist("cvc", str(demo_root / "cvc"), "train", split_file=str(split))


@pytest.fixture
def cvc_copy(demo_root, tmp_path):
    dst = tmp_path / "cvc"
    shutil.copytree(demo_root / "cvc", dst)
    return dst


def test_missing_and_empty_dataset(tmp_path, cvc_copy):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        make_datalist("cvc", str(tmp_path / "nowhere"), "train")
    for f in (cvc_copy / "Original").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"Original: no images"):
        make_datalist("cvc", str(cvc_copy), "train")


def test_unpaired_files_are_named(cvc_copy):
    (cvc_copy / "Ground Truth" / "3.png").unlink()
    with pytest.raises(DatasetError, match=r"Original/3\.png: no matching mask"):
        make_datalist("cvc", str(cvc_copy), "train")


def test_extra_mask_is_named(cvc_copy):
    shutil.copy(cvc_copy / "Ground Truth" / "3.png", cvc_copy / "Ground Truth" / "999.png")
    with pytest.raises(DatasetError, match=r"999\.png: no matching image"):
        make_datalist("cvc", str(cvc_copy), "train")


def test_corrupt_image_is_named(cvc_copy):
    (cvc_copy / "Original" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match=r"Original/2\.png: cannot be read"):
        make_datalist("cvc", str(cvc_copy), "train")


def test_size_mismatch_is_named(cvc_copy):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(cvc_copy / "Ground Truth" / "4.png")
    with pytest.raises(DatasetError, match=r"Ground Truth/4\.png: mask size \(12, 10\) differs"):
        make_datalist("cvc", str(cvc_copy), "train")


def test_unknown_dataset_name(demo_root):
    with pytest.raises(DatasetError, match="unknown 2D dataset 'btcv2'"):
        make_datalist("btcv2", str(demo_root), "train")


def test_16_bit_and_float_images_give_the_8_bit_result(demo_root, tmp_path, caplog):
    """16-bit PNG/TIFF and float TIFF copies of an 8-bit image: the same network input and the same mask."""
    from conftest import build_tiny_sdseg, parse_configs

    from scripts.sampler import SDSegInferer

    gray = np.asarray(Image.open(demo_root / "cvc" / "Original" / "1.png").convert("L"))
    Image.fromarray(gray).save(tmp_path / "8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.tif")
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16" and Image.open(tmp_path / "float.tif").mode == "F"
    pre = parse_configs(["inference.yaml", "tiny.yaml"]).get_parsed_content("preprocessing")
    images = {p.stem: pre({"image": str(p)})["image"] for p in sorted(tmp_path.iterdir())}
    model = build_tiny_sdseg(seed=0).eval()
    model.scale_factor.fill_(1.0)
    masks = {k: SDSegInferer(seed=0)(x[None], model) > 0.5 for k, x in images.items()}
    assert 0 < float(masks["8bit"].float().mean()) < 1
    for name in ("16bit", "float"):
        assert torch.equal(images[name], images["8bit"]) and torch.equal(masks[name], masks["8bit"]), name
    # 16-bit masks: 0/65535 and 0/1 label maps give the 8-bit mask's target
    mask8 = (gray > 128).astype(np.uint8) * 255
    Image.fromarray(mask8).save(tmp_path / "mask8.png")
    Image.fromarray(mask8.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
    Image.fromarray((mask8 > 0).astype(np.uint16)).save(tmp_path / "labels16.png")
    load = parse_configs(["inference.yaml", "evaluate.yaml", "tiny.yaml"]).get_parsed_content("preprocessing")
    targets = [
        load({"image": str(tmp_path / "8bit.png"), "label": str(tmp_path / m)})["label"]
        for m in ("mask8.png", "mask16.png", "labels16.png")
    ]
    assert (
        0 < float(targets[0].mean()) < 1 and torch.equal(targets[1], targets[0]) and torch.equal(targets[2], targets[0])
    )
    # values outside the type's usual range: scaled by the image's own range, with a notice naming the file
    Image.fromarray(gray.astype(np.int32) * 10 - 1000).save(tmp_path / "wide.tif")
    with caplog.at_level("WARNING"):
        wide = np.asarray(to_rgb(Image.open(tmp_path / "wide.tif")))
    assert str(tmp_path / "wide.tif") in caplog.text and "scaled" in caplog.text
    assert (
        wide.min() == 0
        and wide.max() == 255
        and np.array_equal(wide[..., 0], np.rint((gray - gray.min()) * (255 / np.ptp(gray))))
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ('["1", "2"]', "expected a JSON object"),  # a list, not {"train": ...}
        ('{"train": "12", "test": ["4"]}', "'train' must be a list of names"),  # read character by character
        ('{"train": [1, 2], "test": ["4"]}', "'train' must be a list of names"),
        ('{"train": ["1", "2"], "validation": ["3"]}', "unknown split(s) ['validation']"),
        ('{"train": ["1", "2", "4"], "val": ["3"], "test": ["4", "5"]}', "'4' is in both 'train' and 'test'"),
        ('{"train": ["1", "2", "2"], "test": ["4"]}', "'2' is twice in 'train'"),
    ],
)
def test_bad_split_files_are_named(demo_root, tmp_path, content, message):
    split = tmp_path / "split.json"
    split.write_text(content)
    with pytest.raises(DatasetError) as err:
        make_datalist("cvc", str(demo_root / "cvc"), "test", split_file=str(split))
    assert str(err.value).startswith(f"{split}: ") and message in str(err.value)


def test_two_files_with_one_name_are_an_error(cvc_copy):
    Image.open(cvc_copy / "Original" / "7.png").convert("RGB").save(cvc_copy / "Original" / "7.jpg")
    with pytest.raises(DatasetError) as err:
        make_datalist("cvc", str(cvc_copy), "train")
    assert f"{cvc_copy / 'Original'}: 7.jpg and 7.png" in str(err.value)


def test_fewer_training_images_than_one_batch_stop_before_training(demo_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text('{"train": ["1", "2", "3"], "val": ["4"], "test": ["5"]}')
    parser = tiny_parser(dataset_dir=str(demo_root / "cvc"), split_file=str(split), num_workers=0, batch_size=4)
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what the config expression raises
        parser.get_parsed_content("training#0")  # the first step of `run training`: reads and checks the data
    cause = err.value.__cause__
    assert isinstance(
        cause, DatasetError
    ) and f"{demo_root / 'cvc'}: 3 training items, fewer than one batch of 4" in str(cause)
    parser = tiny_parser(dataset_dir=str(demo_root / "cvc"), split_file=str(split), num_workers=0, batch_size=3)
    assert parser.get_parsed_content("training#0") == 1 + 1  # one batch per pass, one validation image


def test_training_masks_without_any_foreground_are_an_error(cvc_copy):
    for f in (cvc_copy / "Ground Truth").iterdir():
        Image.fromarray(np.zeros(Image.open(f).size[::-1], np.uint8)).save(f)
    with pytest.raises(DatasetError, match=r"Ground Truth: none of the 18 training masks has any foreground"):
        make_datalist("cvc", str(cvc_copy), "train")
    assert len(make_datalist("cvc", str(cvc_copy), "test")) == 3  # other splits may lack targets


def test_nearly_empty_training_masks_are_warned_about(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(1, 131):  # 104 training masks, one of them with a target: under 1 %
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.full((16, 16), 255 if i == 7 else 0, np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    with caplog.at_level("WARNING"):
        assert len(make_datalist("kvasir", str(tmp_path), "train")) == 104
    assert f"{tmp_path / 'masks'}: only 1 of the 104 training masks (1.0 %) has any foreground" in caplog.text


def test_truncated_image_is_named_when_read(demo_root, tmp_path):
    """`--input_dir` files are not opened before the run: a PNG cut short fails when read, naming the file."""
    import traceback

    from conftest import parse_configs

    from scripts.data import image_list

    (tmp_path / "in").mkdir()
    data = (demo_root / "cvc" / "Original" / "2.png").read_bytes()
    (tmp_path / "in" / "2.png").write_bytes(data[: len(data) // 2])
    pre = parse_configs(["inference.yaml", "tiny.yaml"]).get_parsed_content("preprocessing")
    with pytest.raises(Exception) as err:
        pre(image_list(str(tmp_path / "in"))[0])
    text = "".join(traceback.format_exception(err.value))
    assert f"{tmp_path / 'in' / '2.png'}: cannot be read (OSError: image file is truncated" in text
