"""Export of a multi-class SDSeg: the exported program (torch.export, ONNX) gives the bundle's own label maps.

The model is a fresh tiny multi-class SDSeg whose zero-initialised parts are randomised
(``input_dependent_tiny_sdseg``: a fresh SDSeg gives every slice the same map, which proves nothing; each comparison
first checks that two slices get different maps). Its weights are saved as a checkpoint and exported by
``python -m scripts.tools.export --classes ... --mask_encoding ...`` (in-process) with the CT overlay, as a user
would. The reference is the bundle's own prediction on the same demo BTCV volume: the CT config's ``inferer`` (every
axial slice through the sampler), the codec's ``prediction`` (argmax) and its label values (what SaveVolumed writes).
Label maps must be identical except at pixels whose two best eager class probabilities are within 5e-4 (``TIE``).
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import ROOT, input_dependent_tiny_sdseg

from scripts.bundle_config import parse_configs
from scripts.classes import get_class_set
from scripts.tools.export import SingleStepSegmenter, main

# the CT inferer runs the slices 8 at a time, the exported program all at once: float sums in another order move
# the probabilities by up to 6e-5 (seen), so scores agree to SCORE_TOL and labels may differ only at near-ties
SCORE_TOL, TIE = 2e-4, 5e-4
CONFIGS = str([str(ROOT / "configs" / c) for c in ("inference.yaml", "ct.yaml", "tiny.yaml")])
CASES = [("all13", "colour"), ("all13", "onehot"), ("transunet8", "colour")]


class Case:
    """One (classes, encoding): the model's checkpoint, the demo volume's slices and the bundle's label map."""

    def __init__(self, classes: str, encoding: str, demo_volumes, tmp_path):
        self.classes, self.encoding, self.class_set = classes, encoding, get_class_set(classes)
        parser = parse_configs(["inference.yaml", "ct.yaml", "tiny.yaml"], classes=classes, mask_encoding=encoding)
        image = demo_volumes / "btcv" / "img" / "img0001.nii.gz"
        volume = parser.get_parsed_content("preprocessing")({"image": str(image)})
        self.network = input_dependent_tiny_sdseg(seed=0, classes=classes, mask_encoding=encoding).eval()
        with torch.no_grad():
            score = parser.get_parsed_content("inferer")(volume["image"][None], self.network)  # (1, C, S, S, D)
        index = parser.get_parsed_content("mask_codec").prediction("pred")({"pred": score[0]})["pred"]
        # (B = D, ...) slices for the exported program; the bundle's label map and scores in the same order
        self.slices = volume["image"].as_tensor().permute(3, 0, 1, 2).contiguous()
        self.score = score[0].as_tensor().permute(3, 0, 1, 2)
        self.labels = self.class_set.to_values(torch.as_tensor(index).permute(3, 0, 1, 2).float())
        self.ckpt_dir = tmp_path / "ckpt"
        self.ckpt_dir.mkdir()
        torch.save(self.network.state_dict(), self.ckpt_dir / "model.pt")

    def export(self, fmt: str, path):
        args = ["--config_file", CONFIGS, "--ckpt_dir", str(self.ckpt_dir), "--output", str(path)]
        args += ["--format", fmt, "--skip_check", "--classes", self.classes, "--mask_encoding", self.encoding]
        return main(args)

    def assert_same_labels(self, labels: torch.Tensor, n: int | None = None):
        """The exported label map is the bundle's, up to near-ties of the two best classes."""
        ref, score = self.labels[:n], self.score[:n]
        assert labels.shape == ref.shape and labels.dtype == torch.float32
        top2 = score.topk(2, dim=1).values
        differ = (labels != ref)[:, 0]
        assert differ.float().mean() < 1e-3 and ((top2[:, 0] - top2[:, 1])[differ] <= TIE).all()


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-{e}" for c, e in CASES])
def case(request, demo_volumes, tmp_path_factory) -> Case:
    return Case(*request.param, demo_volumes, tmp_path_factory.mktemp("export"))


def assert_label_maps_mean_something(labels: torch.Tensor, class_set):
    """Several organs, only the class set's label values, and different slices get different maps (the model
    looks at its input: else "the same as the bundle" holds even for a path that drops the image)."""
    values = set(labels.unique().tolist())
    assert values <= set(class_set.values) and len(values - {0}) >= 3, values
    assert (labels[len(labels) // 2] != labels[0]).float().mean() > 0.01


def test_torch_export_gives_the_bundles_label_values(case, tmp_path):
    assert_label_maps_mean_something(case.labels, case.class_set)
    out = case.export("torch_export", tmp_path / "sdseg.pt2")
    with zipfile.ZipFile(out) as z:
        settings = json.loads(z.read(next(n for n in z.namelist() if n.endswith("export.json"))))
    assert settings["classes"] == case.classes and settings["mask_encoding"] == case.encoding
    assert settings["labels"] == {str(v): n for v, n in zip(case.class_set.values, case.class_set.names)}
    run = torch.export.load(str(out)).module()
    with torch.no_grad():
        labels = run(case.slices)
        assert_label_maps_mean_something(labels, case.class_set)  # transunet8: BTCV ids (liver 6), not indices
        case.assert_same_labels(labels)
        case.assert_same_labels(run(case.slices[:1]), 1)  # dynamic batch


def test_segmenter_scores_are_the_inferers_class_probabilities(case):
    """--output_type score: the C probabilities of the CT config's inferer (same noise draw), one channel per class."""
    with torch.no_grad():
        score = SingleStepSegmenter(case.network, case.slices.shape[-1], seed=0, output="score")(case.slices)
    assert score.shape[1] == case.class_set.num_classes and (score - case.score).abs().max() < SCORE_TOL


@pytest.mark.parametrize("case", [CASES[0]], indirect=True, ids=["all13-colour"])
def test_onnx_gives_the_bundles_label_values_and_names_them(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    out = case.export("onnx", tmp_path / "sdseg.onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    labels = json.loads(props["labels"])
    assert props["classes"] == "all13" and labels["6"] == "liver" and labels["11"] == "pancreas" and len(labels) == 14
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred"]
    (pred,) = session.run(["pred"], {"image": case.slices.numpy()})
    pred = torch.as_tensor(pred)
    assert_label_maps_mean_something(pred, case.class_set)
    case.assert_same_labels(pred)
