"""--classes on CT volumes beyond tests/test_classes.py: --foreground beside --classes, label values landing in the
right organ through the volume chain, bad --classes on every CT config, the README's BTCV commands resolved, and the
stability run (seed spread of the per-organ Dice)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import parse_configs, run_bundle

from scripts.classes import get_class_set
from scripts.metrics import class_scores
from scripts.volumes.transforms import volume_transforms

BTCV_WINDOW = (-175, 250)
AE = ["train.yaml", "train_autoencoder.yaml", "ct.yaml", "tiny.yaml"]
TRAIN = ["train.yaml", "ct.yaml", "tiny.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml"]
INFER = ["inference.yaml", "ct.yaml", "tiny.yaml"]


def btcv_item(root, case="0005", label=None):
    return {
        "image": str(root / "btcv" / "img" / f"img{case}.nii.gz"),
        "label": str(label or root / "btcv" / "label" / f"label{case}.nii.gz"),
    }


# ---- --foreground beside --classes --------------------------------------------------------------------
@pytest.mark.parametrize("files", [AE, TRAIN, EVAL, INFER], ids=["autoencoder", "training", "evaluate", "inference"])
@pytest.mark.parametrize("foreground, classes", [("liver", "all13"), ("all13", "all13"), ("transunet8", "transunet8")])
def test_foreground_with_multiclass_classes_is_refused_at_start(files, foreground, classes, demo_volumes):
    """--foreground is the binary rule; beside --classes all13|transunet8 the CT configs stop when their volume chain
    is built (before anything is read), saying to drop it, on each of the four CT configs."""
    key = "volume_transform" if files[0] == "train.yaml" else "preprocessing"
    parser = parse_configs(files, dataset_dir=str(demo_volumes / "btcv"), foreground=foreground, classes=classes)
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the constructor's ValueError
        parser.get_parsed_content(key)
    message = str(err.value.__cause__)
    assert f"--foreground {foreground} is the binary foreground; --classes {classes}" in message
    assert "drop --foreground" in message


def test_foreground_with_classes_stops_the_cli_before_reading(demo_volumes, tmp_path):
    """As typed: the autoencoder stage with --foreground liver --classes all13 exits with the message, no cache."""
    with pytest.raises(AssertionError, match="--foreground liver is the binary foreground; --classes all13") as err:
        run_bundle(
            "training",
            AE,
            tmp_path,
            *("--bundle_root", str(tmp_path), "--dataset_dir", str(demo_volumes / "btcv")),
            *("--foreground", "liver", "--classes", "all13"),
        )
    assert "drop --foreground" in str(err.value) and not (tmp_path / "data" / "cache").exists()


def test_foreground_default_and_binary_cache_key_are_unchanged(demo_volumes):
    """ct.yaml's foreground is null now: binary reads it as all13 (the paper), with the cache signature it had when
    the default was the literal "all13", so binary caches and results stay as they were; --classes alone is fine."""
    parser = parse_configs(TRAIN, dataset_dir=str(demo_volumes / "btcv"))
    assert parser.get_parsed_content("foreground") is None
    chain = parser.get_parsed_content("volume_transform")
    size = parser.get_parsed_content("image_size")
    assert json.loads(chain.signature) == ["btcv", [-175, 250], size, "all13", True, 1]
    explicit = volume_transforms("btcv", BTCV_WINDOW, size, foreground="all13")
    assert explicit.signature == chain.signature
    item = btcv_item(demo_volumes)
    assert torch.equal(chain(dict(item))["label"], explicit(dict(item))["label"])
    multi = parse_configs(TRAIN, dataset_dir=str(demo_volumes / "btcv"), classes="all13")
    assert json.loads(multi.get_parsed_content("volume_transform").signature)[-1] == "all13"
    with pytest.raises(ValueError, match="foreground must be 'all13' or 'transunet8', got 'liver'"):
        volume_transforms("btcv", BTCV_WINDOW, 32, foreground="liver")  # binary: still checked


# ---- label values land in the right organ, through the volume chain ---------------------------------------
@pytest.mark.parametrize("classes", ["all13", "transunet8"])
def test_swapped_organs_in_a_label_file_get_swapped_dice(demo_volumes, tmp_path, classes):
    """A label file read by the evaluation chain scores 1 per organ against itself; the same volume with spleen (1)
    and liver (6) swapped in the file scores 0 on exactly those two organs, in their own columns, and the other
    organs keep 1: BTCV ids reach the right class (and column) in both class sets."""
    c = get_class_set(classes)
    src = nib.load(demo_volumes / "btcv" / "label" / "label0005.nii.gz")
    data = np.asarray(src.dataobj).copy()
    swapped = data.copy()
    swapped[data == 1], swapped[data == 6] = 6, 1
    nib.save(nib.Nifti1Image(swapped, src.affine, src.header), tmp_path / "label0005.nii.gz")
    chain = volume_transforms("btcv", BTCV_WINDOW, 32, resample_label=False, classes=classes)
    truth = chain(btcv_item(demo_volumes))["label"]
    other = chain(btcv_item(demo_volumes, label=tmp_path / "label0005.nii.gz"))["label"]
    kept, back = np.isin(data, c.values), c.to_values(truth[0]).numpy()
    assert np.array_equal(back[kept], data[kept]) and not back[~kept].any()  # the file's ids, voxel for voxel
    right, wrong = class_scores(truth, truth, c.names, hd=False), class_scores(other, truth, c.names, hd=False)
    assert all(right[f"dice_{n}"] == 1 for n in c.organs)
    assert wrong["dice_spleen"] == wrong["dice_liver"] == 0
    assert all(wrong[f"dice_{n}"] == 1 for n in c.organs if n not in ("spleen", "liver"))
    assert c.names.index("liver") == (6 if classes == "all13" else 5)  # transunet8 renumbers the classes


# ---- unknown --classes on every CT config ------------------------------------------------------------------
@pytest.mark.parametrize("files", [AE, TRAIN, EVAL, INFER], ids=["autoencoder", "training", "evaluate", "inference"])
def test_unknown_classes_fails_listing_the_choices_on_every_ct_config(files, demo_volumes):
    key = "volume_transform" if files[0] == "train.yaml" else "preprocessing"
    parser = parse_configs(files, dataset_dir=str(demo_volumes / "btcv"), classes="organs")
    for k in ("mask_codec", key):
        with pytest.raises(RuntimeError) as err:
            parser.get_parsed_content(k)
        assert "unknown --classes 'organs'; choose one of binary, all13, transunet8, disc_cup" in str(
            err.value.__cause__
        ), k


# ---- README: training and evaluating all 13 organs on BTCV -----------------------------------------------
def test_readme_btcv_all13_commands_resolve(demo_volumes, tmp_path):
    """README's commands with ``--classes all13`` (both training stages, evaluate, stability), merged and resolved as
    typed (their config files, order and options; the demo volumes as --dataset_dir): the all13 codec, the volume
    chain, the data lists, and per-organ columns in the report; beyond test_readme.py's key check, nothing stale."""
    from test_readme import BUNDLE, config_files, options

    c, seen = get_class_set("all13"), set()
    for cmd in [c for c in BUNDLE if options(c[3:]).get("classes") == "all13"]:
        opts, run_id = options(cmd[3:]), cmd[3]
        files = [f.name for f in config_files(opts.pop("config_file"))]
        opts.update(dataset_dir=str(demo_volumes / "btcv"), bundle_root=str(tmp_path))
        parser = parse_configs(files, **opts)
        assert parser.get_parsed_content("mask_codec").class_names == c.names
        assert parser.get_parsed_content("foreground") is None and "ct.yaml" in files
        if run_id == "training":
            chain = parser.get_parsed_content("volume_transform")
            assert json.loads(chain.signature)[-1] == "all13"
            assert [d["name"] for d in parser.get_parsed_content("train#dataset#data")] == [
                "img0005",
                "img0006",
                "img0007",
            ]
            parser.get_parsed_content("autoencoder_def")
            seen.add("autoencoder stage" if "train_autoencoder.yaml" in files else "sdseg stage")
            continue
        parser.get_parsed_content("preprocessing")
        assert [d["name"] for d in parser.get_parsed_content("datalist")] == ["img0001", "img0002"]
        if run_id == "evaluate":
            assert parser.get_parsed_content("report").class_names == c.names
        if run_id == "stability":
            assert parser.get_parsed_content("stability_evaluation#seed_dice").class_names == c.names
        seen.add(run_id)
    assert seen == {"autoencoder stage", "sdseg stage", "evaluate", "stability"}


# ---- stability: the seed spread of the per-organ Dice ----------------------------------------------------
def test_stability_all13_reports_per_organ_dice_per_seed_and_its_spread(demo_volumes, tmp_path):
    """``run stability --classes all13`` through ct.yaml on generated volumes (a random-weight tiny model whose masks
    depend on the image and the noise): per seed the mean organ Dice and one Dice per organ, each run scored as
    ``evaluate`` scores it, and the spread over the seeds (max - min, with std) of every column."""
    from conftest import input_dependent_tiny_sdseg

    root, c = tmp_path, get_class_set("all13")
    (root / "models").mkdir()
    model = input_dependent_tiny_sdseg(seed=0, classes="all13")
    torch.save({"model": model.state_dict()}, root / "models" / "model.pt")
    files = ["inference.yaml", "ct.yaml", "stability.yaml", "tiny.yaml"]
    common = ["--bundle_root", str(root), "--dataset_dir", str(demo_volumes / "btcv"), "--classes", "all13"]
    proc = run_bundle("stability", files, root, *common, "--image_size", "32", "--num_runs", "3", "--lpips_net", "none")
    out = root / "eval" / "stability"
    assert not (out / "stability_reference.tmp").exists()  # the reference run's maps were scratch, now gone
    seeds = json.loads((out / "stability.json").read_text())["seeds"]
    assert seeds["key"] == "organ_mean_dice" and [r["seed"] for r in seeds["per_seed"]] == [0, 1, 2]
    columns = ["organ_mean_dice", *(f"dice_{n}" for n in c.organs)]
    # each seed's figures are that run's own evaluation (seeds/seed<S>/summary.json, per-volume metrics.csv)
    for row in seeds["per_seed"]:
        summary = json.loads((out / "seeds" / f"seed{row['seed']}" / "summary.json").read_text())
        assert row["organ_mean_dice"] == pytest.approx(summary["organ_mean_dice"])
        assert all(row[k] == pytest.approx(summary[k]["mean"], nan_ok=True) for k in columns[1:])
        lines = (out / "seeds" / f"seed{row['seed']}" / "metrics.csv").read_text().splitlines()
        header, cases = lines[0].split(","), [dict(zip(lines[0].split(","), x.split(","))) for x in lines[1:]]
        assert [x["name"] for x in cases] == ["img0001.nii.gz", "img0002.nii.gz"] and "dice_liver" in header
        organ_means = [np.nanmean([float(x[f"dice_{n}"]) for x in cases]) for n in c.organs]
        assert row["organ_mean_dice"] == pytest.approx(np.nanmean(organ_means))
    # the seeds are different runs: their per-volume organ Dice differ
    per_seed = {k: [r[k] for r in seeds["per_seed"]] for k in columns}
    assert len(set(per_seed["organ_mean_dice"])) == 3
    # the spread of each column is max - min of that column's per-seed values (std the population std)
    for k in columns:
        values = [v for v in per_seed[k] if v == v]
        assert seeds["spread"][k]["spread"] == pytest.approx(max(values) - min(values)), k
        assert seeds["spread"][k]["std"] == pytest.approx(float(np.std(values))), k
    assert seeds["spread"]["organ_mean_dice"]["spread"] > 0
    spreads = {round(seeds["spread"][k]["spread"], 9) for k in columns}
    assert len(spreads) > 3  # the columns' spreads differ: a spread taken on the wrong column would show
    table = (out / "stability_seeds.csv").read_text().splitlines()
    assert table[0].startswith("seed,dice,iou,organ_mean_dice,dice_spleen,") and table[0].endswith("adrenal_gland_left")
    assert [r.split(",")[0] for r in table[1:]] == ["0", "1", "2", "spread", "mean", "std"]
    assert float(table[4].split(",")[3]) == pytest.approx(seeds["spread"]["organ_mean_dice"]["spread"])
    assert "seed spread of organ_mean_dice" in proc.stdout and "| seed | organ_mean_dice | dice_spleen |" in proc.stdout
    # evaluate with the same seed gives the same figures (the stability run scores as evaluate does)
    parse_configs(
        EVAL,
        bundle_root=str(root),
        dataset_dir=str(demo_volumes / "btcv"),
        classes="all13",
        image_size=32,
        seed=1,
        eval_dir=str(root / "eval1"),
        device="$torch.device('cpu')",
    ).get_parsed_content("evaluate")
    evaluated = json.loads((root / "eval1" / "summary.json").read_text())
    assert evaluated["organ_mean_dice"] == pytest.approx(seeds["per_seed"][1]["organ_mean_dice"])
