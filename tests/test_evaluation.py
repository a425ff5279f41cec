"""Evaluation suite: stability (Table 5), reverse-process sweep (Table 4), ablation overlays (Table 6), pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, build_tiny_sdseg, parse_configs, run_bundle
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.networks.nets.diffusion_model_unet import SpatialTransformer
from monai.networks.schedulers import DDIMScheduler
from PIL import Image
from torch import nn

from scripts.evaluation import ReverseSweep, configured_sampler, run_with_inferer
from scripts.figures import case_grid
from scripts.handlers import OutputFeed
from scripts.sampler import SDSegInferer
from scripts.stability import StabilityEvaluation
from scripts.stability_metrics import StabilityAccumulator, load_lpips, ms_ssim_settings
from scripts.tools.figures import training_curves

ABLATIONS = {  # overlay -> (fusion, trainable encoder, lambda), paper Table 6 rows
    "ablation_crossattn_frozen.yaml": ("crossattn", False, 0.0),
    "ablation_concat_frozen.yaml": ("concat", False, 0.0),
    "ablation_concat_trainable.yaml": ("concat", True, 0.0),
    "ablation_concat_trainable_latent.yaml": ("concat", True, 1.0),
}


class StubSDSeg(nn.Module):
    """The interface SDSegInferer uses; the score depends on the noise through ``gain`` (0: deterministic)."""

    num_train_timesteps = 1000
    prediction_type = "epsilon"

    def __init__(self, gain: float = 0.0):
        super().__init__()
        self.gain = gain

    def encode_image(self, image):
        return F.avg_pool2d(image, 8).mean(1, keepdim=True).expand(-1, 4, -1, -1) * 3

    def latent_shape(self, image):
        return (4, image.shape[-2] // 8, image.shape[-1] // 8)

    def model_output(self, z_t, t, z_c):
        return z_c + self.gain * z_t

    def estimate_z0(self, z_t, t, noise_pred):
        return noise_pred

    def decode_score(self, z0):
        return torch.sigmoid(2 * F.interpolate(z0.mean(1, keepdim=True), scale_factor=8, mode="bilinear"))


def named_images(names, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = {n: torch.rand((3, size, size), generator=g) * 2 - 1 for n in sorted(names)}
    return [{"image": MetaTensor(images[n], meta={"filename_or_obj": f"/data/{n}.png"})} for n in names]


def stub_evaluator(items, gain=0.0):
    loader = DataLoader(Dataset(items), batch_size=3, shuffle=False, num_workers=0)
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=StubSDSeg(gain), inferer=SDSegInferer()
    )


def random_maps(names, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand((1, size, size), generator=g) for n in names}


# ---- stability ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [100.0, None])
def test_deterministic_model_gives_identical_runs_without_crashing(tmp_path, cap):
    names = [f"case{i}" for i in range(5)]
    ev = StabilityEvaluation(
        stub_evaluator(named_images(names)), str(tmp_path), num_runs=3, psnr_cap=cap, lpips_net="none"
    )
    result = ev.run()
    table, notes = result["table"], result["notes"]
    for kind in ("seg", "score"):
        assert table[f"psnr_{kind}"] == (math.inf if cap is None else cap)
        assert table[f"ssim_{kind}"] == pytest.approx(1.0) and table[f"ms_ssim_{kind}"] == pytest.approx(1.0)
        assert notes["identical_pairs"][kind] == "10 of 10"
        assert math.isnan(table[f"lpips_{kind}"])
    assert (
        notes["lpips"].startswith("unavailable") and "3 scale(s)" in notes["ms_ssim"] and "160 px" in notes["ms_ssim"]
    )
    saved = json.loads((tmp_path / "stability.json").read_text())  # strict JSON: no NaN / Infinity tokens
    assert saved["table"]["lpips_seg"] is None and saved["table"]["psnr_seg"] == ("inf" if cap is None else cap)
    assert (tmp_path / "stability.csv").read_text().startswith("method,lpips_seg,lpips_score,psnr_seg")
    assert len((tmp_path / "stability_per_image.csv").read_text().splitlines()) == 1 + 5


def test_noisy_stub_runs_differ_and_seeds_are_reproducible(tmp_path):
    items = named_images([f"case{i}" for i in range(4)])
    a = StabilityEvaluation(stub_evaluator(items, gain=0.3), str(tmp_path / "a"), num_runs=3, lpips_net="none").run()
    b = StabilityEvaluation(stub_evaluator(items, gain=0.3), str(tmp_path / "b"), num_runs=3, lpips_net="none").run()
    assert a["table"] == pytest.approx(b["table"], nan_ok=True)
    assert a["table"]["ssim_score"] < 1 and a["table"]["psnr_score"] < 100


def flipped(masks, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.where(torch.rand(m.shape, generator=g) < fraction, 1 - m, m) for n, m in masks.items()}


def test_less_noise_gives_higher_psnr_and_ssim():
    names = [f"c{i}" for i in range(6)]
    masks = {n: (m > 0.5).float() for n, m in random_maps(names).items()}
    results = {}
    for fraction in (0.01, 0.05, 0.2):
        acc = StabilityAccumulator(lpips_net="none")
        acc.add(masks)
        for run in range(2):
            acc.add(flipped(masks, fraction, seed=10 + run))
        results[fraction] = acc.result()["table"]
    for key in ("psnr_seg", "ssim_seg", "ms_ssim_seg", "psnr_score", "ssim_score", "ms_ssim_score"):
        assert results[0.01][key] > results[0.05][key] > results[0.2][key], key
    assert results[0.01]["psnr_seg"] == pytest.approx(20.0, abs=0.5)  # MSE = 0.01 -> 20 dB


def test_runs_are_paired_by_name_not_order():
    names = [f"img{i:02d}" for i in range(8)]
    ref = random_maps(names, seed=1)
    changed = dict(ref, img03=1 - ref["img03"])
    shuffled = {n: changed[n] for n in np.random.default_rng(0).permutation(names)}
    acc = StabilityAccumulator(lpips_net="none")
    acc.add(ref)
    acc.add(shuffled)
    rows = {r["name"]: r for r in acc.per_image()}
    assert rows["img03"]["ssim_score"] < 0.5 and all(
        rows[n]["ssim_score"] == pytest.approx(1.0) for n in names if n != "img03"
    )
    with pytest.raises(ValueError, match="missing \\['img07'\\]"):
        acc.add({n: ref[n] for n in names[:-1]})


def test_pairing_survives_shuffled_file_order():
    """Two evaluators load the same files in different orders: outputs pair by file name."""
    names = [f"case{i}" for i in range(6)]
    items = named_images(names)
    outputs = []
    for order in (items, items[::-1], [items[i] for i in (3, 0, 5, 1, 4, 2)]):
        evaluator = stub_evaluator(order)
        collected = {}
        OutputFeed(sink=collected.update).attach(evaluator)
        run_with_inferer(evaluator, SDSegInferer(seed=3))
        outputs.append(collected)
    acc = StabilityAccumulator(lpips_net="none")
    for out in outputs:
        acc.add(out)
    assert acc.result()["notes"]["identical_pairs"] == {"seg": "12 of 12", "score": "12 of 12"}


def test_volumes_of_different_sizes_and_wrapped_inferers():
    """3D maps (1, H, W, D) of different depths; a wrapper such as the slice-by-slice inferer keeps wrapping."""
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.rand((1, 32, 32, 20), generator=g), "b": torch.rand((1, 32, 32, 12), generator=g)}
    acc = StabilityAccumulator(lpips_net="alex", lpips_pnet_rand=True)
    acc.add(ref)
    acc.add({"b": ref["b"], "a": ref["a"].flip(-1)})
    rows = {r["name"]: r for r in acc.per_image()}
    assert rows["b"]["ssim_score"] == pytest.approx(1.0) and rows["a"]["ssim_score"] < 0.5
    assert acc.lpips_runs["score"][0] > 0

    class Wrapper(Inferer):
        def __init__(self, inferer):
            super().__init__()
            self.inferer = inferer

        def __call__(self, inputs, network, *args, **kwargs):
            return self.inferer(inputs, network)

    evaluator = stub_evaluator(named_images(["x", "y"]))
    evaluator.inferer = wrapper = Wrapper(SDSegInferer(seed=0))
    seen = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.inferer))
    seconds, slices = run_with_inferer(evaluator, SDSegInferer(seed=5))
    assert seconds > 0 and slices == 2
    assert isinstance(seen[0], Wrapper) and seen[0] is not wrapper and seen[0].inferer.inferer.seed == 5
    assert evaluator.inferer is wrapper and wrapper.inferer.seed == 0


# ---- stability: streamed against the reference on disk, not runs in RAM ----------------------------------------
def direct_stability(runs, lpips_model=None, cap=100.0, threshold=0.5):
    """The figures computed at once on whole stacks of every run's maps (all in memory, names sorted): per-image
    PSNR / SSIM / MS-SSIM averaged over the runs after the first, LPIPS as a mean over images, then over runs."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    ref, names = runs[0], sorted(runs[0])
    sd = ref[names[0]].ndim - 1
    kernel, weights, _ = ms_ssim_settings(min(min(v.shape[1:]) for v in ref.values()))

    def seg(x):
        if x.shape[1] > 1:
            return F.one_hot(x.argmax(1), x.shape[1]).movedim(-1, 1).float()
        return (x > threshold).float()

    def lpips_mean(a, b):  # per image: the mean over its channels (and slices) of LPIPS on 3-channel copies
        values = []
        for x, y in zip(a, b):
            pairs = [(x[c], y[c]) for c in range(x.shape[0])]
            if sd == 3:
                pairs = [(p[..., k], q[..., k]) for p, q in pairs for k in range(p.shape[-1])]
            d = [
                float(lpips_model(p.expand(1, 3, *p.shape), q.expand(1, 3, *q.shape), normalize=True)) for p, q in pairs
            ]
            values.append(sum(d) / len(d))
        return sum(values) / len(values)

    metrics = {
        "psnr": PSNRMetric(max_val=1.0, reduction="none"),
        "ssim": SSIMMetric(spatial_dims=sd, data_range=1.0, reduction="none"),
        "ms_ssim": MultiScaleSSIMMetric(
            spatial_dims=sd, data_range=1.0, kernel_size=kernel, weights=weights, reduction="none"
        ),
    }
    sums = {n: {} for n in names}
    lpips_runs = {"seg": [], "score": []}
    by_shape = {}
    for n in names:
        by_shape.setdefault(tuple(ref[n].shape), []).append(n)
    for run in runs[1:]:
        lp = {"seg": 0.0, "score": 0.0}
        for group in by_shape.values():
            a, b = torch.stack([ref[n] for n in group]), torch.stack([run[n] for n in group])
            for kind, (x, y) in (("seg", (seg(a), seg(b))), ("score", (a, b))):
                for m, fn in metrics.items():
                    values = fn(y, x).view(-1)
                    fn.reset()
                    values = values.clamp(max=cap) if m == "psnr" else values
                    for n, v in zip(group, values.tolist()):
                        sums[n][f"{m}_{kind}"] = sums[n].get(f"{m}_{kind}", 0.0) + v
                if lpips_model is not None:
                    lp[kind] += lpips_mean(x, y) * len(group) / len(names)
        for kind in lp:
            lpips_runs[kind].append(lp[kind])
    rows = {n: {k: v / (len(runs) - 1) for k, v in sums[n].items()} for n in names}
    return rows, {k: sum(v) / len(v) for k, v in lpips_runs.items()} if lpips_model is not None else None


def assert_same_figures(rows, lpips, acc_rows, acc_lpips_runs):
    got = {r["name"]: r for r in acc_rows}
    assert sorted(got) == sorted(rows)
    for n, row in rows.items():
        for k, v in row.items():
            assert got[n][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (n, k)
    if lpips is not None:
        for kind, v in lpips.items():
            runs = acc_lpips_runs[kind]
            assert sum(runs) / len(runs) == pytest.approx(v, rel=1e-6, abs=1e-9), kind


def test_streamed_2d_binary_run_equals_the_all_in_memory_computation(tmp_path, monkeypatch):
    """The bundle's path (each batch compared as it is produced, the reference read back from disk) gives the figures
    computed on whole stacks of every run's maps held in memory (captured here beside the run)."""
    import scripts.stability_metrics as stability_metrics

    lpips_model, _ = load_lpips("alex", pnet_rand=True)
    monkeypatch.setattr(stability_metrics, "load_lpips", lambda net, rand: (lpips_model, "test backbone"))
    items = named_images([f"case{i}" for i in range(7)])
    evaluator = stub_evaluator(items, gain=0.3)
    ev = StabilityEvaluation(evaluator, str(tmp_path), num_runs=3, lpips_net="alex")
    collected, runs = {}, []
    OutputFeed(sink=collected.update).attach(evaluator)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: (runs.append(dict(collected)), collected.clear()))
    result = ev.run()
    assert len(runs) == 3 and result["table"]["ssim_score"] < 1
    rows, lpips = direct_stability(runs, lpips_model)
    got = {r["name"]: r for r in result["per_image"]}
    for n, row in rows.items():
        assert {k: got[n][k] for k in row} == pytest.approx(row, rel=1e-6, abs=1e-7), n
    assert result["table"]["lpips_score"] == pytest.approx(lpips["score"], rel=1e-6)
    assert result["table"]["lpips_seg"] == pytest.approx(lpips["seg"], rel=1e-6)


def test_streamed_multiclass_3d_items_equal_the_all_in_memory_computation():
    """C = 4 class-probability volumes of two depths, fed one case at a time in a shuffled order: the same figures as
    whole stacks in memory, and as whole runs through ``add`` (chunked stacks)."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "a": (4, 32, 32, 16),
        "b": (4, 32, 32, 12),
        "c": (4, 32, 32, 16),
        "d": (4, 32, 32, 12),
        "e": (4, 32, 32, 16),
    }
    ref = {n: torch.softmax(3 * torch.rand(s, generator=g), 0) for n, s in shapes.items()}
    runs = [ref] + [
        {n: torch.softmax(torch.log(v) + torch.rand(v.shape, generator=g), 0) for n, v in ref.items()} for _ in range(2)
    ]
    lpips_model, _ = load_lpips("alex", pnet_rand=True)
    rows, lpips = direct_stability(runs, lpips_model)
    streamed = StabilityAccumulator(lpips_net="none")
    streamed.lpips = lpips_model
    whole = StabilityAccumulator(lpips_net="none", chunk=2)
    whole.lpips = lpips_model
    for run in runs:
        streamed.start_run()
        for n in np.random.default_rng(len(streamed.sums)).permutation(sorted(run)):
            streamed.add_items({n: run[n]})
        streamed.end_run()
        whole.add(run)
    for acc in (streamed, whole):
        assert_same_figures(rows, lpips, acc.per_image(), acc.lpips_runs)
        assert acc.spatial_dims == 3 and acc.result()["notes"]["runs"] == 3
    streamed.close(), whole.close()


@pytest.mark.parametrize("shape", [(2, 5, 48, 40), (1, 6, 32, 32, 20)])
def test_channel_by_channel_ssim_equals_monai(shape):
    """C-class maps: SSIM and MS-SSIM computed one channel at a time are MONAI's figures on the whole map."""
    from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

    from scripts import channel_ssim

    g = torch.Generator().manual_seed(1)
    a = torch.softmax(3 * torch.rand(shape, generator=g), 1)
    b = torch.softmax(torch.log(a) + torch.rand(shape, generator=g), 1)
    sd = len(shape) - 2
    kernel, weights, _ = ms_ssim_settings(min(shape[2:]))
    expected = SSIMMetric(spatial_dims=sd, data_range=1.0, reduction="none")(b, a)
    assert channel_ssim.ssim(b, a, sd).shape == expected.shape
    torch.testing.assert_close(channel_ssim.ssim(b, a, sd), expected, rtol=1e-5, atol=1e-7)
    monai_ms = MultiScaleSSIMMetric(
        spatial_dims=sd, data_range=1.0, kernel_size=kernel, weights=weights, reduction="none"
    )(b, a)
    torch.testing.assert_close(channel_ssim.ms_ssim(b, a, sd, 1.0, kernel, weights), monai_ms, rtol=1e-5, atol=1e-7)


def tensors_held(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes, containers and bound methods (modules, engines and
    the evaluator left out: they hold weights and the batch being processed)."""
    seen = set() if seen is None else seen
    if (
        id(obj) in seen
        or isinstance(obj, (nn.Module, SupervisedEvaluator, type))
        or callable(obj)
        and not hasattr(obj, "__self__")
        and not hasattr(obj, "__dict__")
    ):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif hasattr(obj, "__self__"):
        children = [obj.__self__]
    elif hasattr(obj, "__dict__"):
        children = [v for k, v in vars(obj).items() if k != "evaluator"]
    else:
        return []
    return [t for c in children for t in tensors_held(c, seen)]


def test_stability_run_holds_no_maps_in_ram_and_the_reference_on_disk(tmp_path):
    """After every batch of every run the stability evaluation (its accumulator included) holds no prediction map:
    the later runs' maps are compared and dropped, the first run's are ``.npy`` files in the scratch folder."""
    names = [f"case{i}" for i in range(7)]
    evaluator = stub_evaluator(named_images(names), gain=0.3)
    ev = StabilityEvaluation(evaluator, str(tmp_path), num_runs=3, lpips_net="none")
    scratch, checks = tmp_path / "stability_reference.tmp", []

    def check(engine):
        acc = getattr(getattr(getattr(ev, "feed", None), "sink", None), "__self__", None)
        big = [tuple(t.shape) for t in tensors_held(ev) if t.numel() >= 64 * 64]
        files = len(list(scratch.glob("*.npy")))
        in_ram = isinstance(getattr(acc, "reference", {}), dict)
        checks.append((len(checks) // 3, engine.state.iteration, big, files, in_ram))

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, check)
    ev.run()
    assert [(c[0], c[1]) for c in checks] == [(r, i) for r in range(3) for i in (1, 2, 3)]
    assert all(c[2] == [] for c in checks), checks  # no (1, 64, 64) map anywhere
    assert [c[3] for c in checks] == [3, 6, 7] + [7] * 6  # the reference goes to disk as it comes, then stays there
    assert not any(c[4] for c in checks)


def test_stability_scratch_is_removed_after_a_run_a_failure_and_a_killed_run(tmp_path):
    names = [f"case{i}" for i in range(4)]
    items = named_images(names)
    clean = StabilityEvaluation(stub_evaluator(items, gain=0.3), str(tmp_path / "clean"), num_runs=3, lpips_net="none")
    expected = clean.run()
    assert not (tmp_path / "clean" / "stability_reference.tmp").exists()
    # a run that fails in its second seed: the exception comes through, the scratch goes
    evaluator = stub_evaluator(items, gain=0.3)
    ev = StabilityEvaluation(evaluator, str(tmp_path / "out"), num_runs=3, lpips_net="none")
    calls = []

    def fail(engine):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed in run 2")

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, fail)
    with pytest.raises(RuntimeError, match="killed in run 2"):
        ev.run()
    assert not (tmp_path / "out" / "stability_reference.tmp").exists()
    # a killed run's leftovers (a reference file of another size, a half-written one) do not enter the next run
    scratch = tmp_path / "out" / "stability_reference.tmp"
    scratch.mkdir(parents=True)
    np.save(scratch / "000000.npy", np.zeros((1, 8, 8), np.float32))
    (scratch / "000003.npy").write_bytes(b"\x93NUMPY half")
    ev = StabilityEvaluation(stub_evaluator(items, gain=0.3), str(tmp_path / "out"), num_runs=3, lpips_net="none")
    result = ev.run()
    assert result["per_image"] == expected["per_image"] and result["table"] == pytest.approx(
        expected["table"], nan_ok=True
    )
    assert not scratch.exists()


def test_reference_store_round_trip_and_errors(tmp_path):
    from scripts.reference_store import ReferenceStore

    store = ReferenceStore(tmp_path / "ref")
    x = torch.rand(3, 5, 6, 2)
    store.put("a b/c.nii.gz", MetaTensor(x))
    assert torch.equal(store.get("a b/c.nii.gz"), x) and store.shapes == {"a b/c.nii.gz": (3, 5, 6, 2)}
    assert store.nbytes() >= x.numel() * 4 and "a b/c.nii.gz" in store and len(store) == 1
    with pytest.raises(ValueError, match="two inputs named a b/c.nii.gz"):
        store.put("a b/c.nii.gz", x)
    (tmp_path / "ref" / "notes.txt").write_text("not ours")
    store.remove()  # the store's files go; a foreign file keeps the folder
    assert [p.name for p in (tmp_path / "ref").iterdir()] == ["notes.txt"]
    temporary = ReferenceStore()
    temporary.put("x", x)
    folder = temporary.directory
    assert folder.is_dir()
    temporary.remove()
    assert not folder.exists()


def test_streamed_run_errors_name_the_images():
    g = torch.Generator().manual_seed(0)
    ref = {n: torch.rand((1, 16, 16), generator=g) for n in ("a", "b", "c")}
    acc = StabilityAccumulator(lpips_net="none")
    acc.add(ref)
    acc.start_run()
    acc.add_items({"a": ref["a"], "x": ref["b"]})
    with pytest.raises(ValueError, match="two inputs named a"):
        acc.add_items({"a": ref["a"]})
    with pytest.raises(
        ValueError, match=r"run 2 does not cover the first run's images: missing \['b', 'c'\], extra \['x'\]"
    ):
        acc.end_run()
    assert acc.num_runs == 1 and acc.sums == {}  # the failed run left nothing behind
    acc.start_run()
    with pytest.raises(ValueError, match=r"b: size \(1, 8, 8\) differs from the first run's \(1, 16, 16\)"):
        acc.add_items({"b": torch.rand(1, 8, 8)})
    acc.add({n: 1 - v for n, v in ref.items()})
    assert acc.num_runs == 2 and len(acc.per_image()) == 3
    acc.close()


def test_sweep_and_stability_keep_the_configured_sampler(tmp_path):
    """Their runs change steps, samples and seed only: the evaluator's DDIM scheduler, averaging and fast path stay."""
    ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    configured = SDSegInferer(seed=9, average="latent", compile_kwargs={"mode": "x"}, scheduler=ddim)
    assert configured_sampler(SimpleNamespace(inferer=SimpleNamespace(inferer=configured))) is configured
    assert configured_sampler(None).num_steps == 1  # no SDSegInferer configured: the default single step
    evaluator = stub_evaluator(named_images(["x", "y"]))
    evaluator.inferer = configured
    seen = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.inferer.inferer))
    StabilityEvaluation(evaluator, str(tmp_path / "s"), num_runs=2, num_samples=3, lpips_net="none").run()
    report = SimpleNamespace(rows=[{"dice": 1.0, "iou": 1.0}], output_dir=None)
    ReverseSweep(evaluator, report, str(tmp_path / "r"), settings=[[1, 2]], seed=4).run()
    assert [(s.num_steps, s.num_samples, s.seed) for s in seen] == [(1, 3, 0), (1, 3, 1), (1, 2, 4)]
    for s in seen:
        assert s is not configured and s.scheduler is ddim and s.average == "latent"
        assert s.compile_kwargs == {"mode": "x"} and not s.channels_last
    assert evaluator.inferer is configured


def test_ms_ssim_settings_fit_the_image_size():
    assert ms_ssim_settings(256) == (11, (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), "")
    kernel, weights, note = ms_ssim_settings(64)
    assert kernel == 11 and len(weights) == 3 and sum(weights) == pytest.approx(1.0) and "64 px" in note
    assert ms_ssim_settings(8)[:2] == (7, (1.0,))


def test_lpips_with_random_backbone_and_unavailable_offline(tmp_path, monkeypatch):
    names = [f"c{i}" for i in range(3)]
    ref = random_maps(names)
    acc = StabilityAccumulator(lpips_net="alex", lpips_pnet_rand=True)
    assert "RANDOM backbone" in acc.lpips_status
    acc.add(ref)
    acc.add(ref)
    acc.add({n: 1 - m for n, m in ref.items()})
    assert acc.lpips_runs["score"][0] == pytest.approx(0.0, abs=1e-6) and acc.lpips_runs["score"][1] > 0
    table = acc.result()["table"]
    assert math.isfinite(table["lpips_seg"]) and math.isfinite(table["lpips_score"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no backbone weights
    model, status = load_lpips("alex")
    assert model is None and status.startswith("unavailable") and str(tmp_path) in status


# ---- ablation overlays ---------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", sorted(ABLATIONS))
def test_ablation_overlay_builds_the_expected_model(overlay):
    fusion, trainable, weight = ABLATIONS[overlay]
    torch.manual_seed(0)
    parser = parse_configs(["train.yaml", "tiny.yaml", overlay], autoencoder_path=None, device="$torch.device('cpu')")
    net = parser.get_parsed_content("network")
    assert net.fusion == fusion and parser.get_parsed_content("train#trainer#iteration_update").loss_weight == weight
    assert "models/ablation/" in parser.get_parsed_content("ckpt_dir")
    cross = [m for m in net.unet.modules() if isinstance(m, SpatialTransformer)]
    assert net.unet.conv_in.conv.in_channels == (4 if fusion == "crossattn" else 8)
    assert bool(cross) == (fusion == "crossattn") and net.unet.with_conditioning == (fusion == "crossattn")
    assert all(p.requires_grad == trainable for p in net.vision_encoder.parameters())

    # one training step with the config's optimizer: a frozen encoder does not move, the U-Net does
    optimizer = parser.get_parsed_content("optimizer")
    net.scale_factor.fill_(1.0)
    before = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    image, mask = torch.rand(2, 3, 64, 64) * 2 - 1, (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = net(image, mask=mask, loss_weight=weight)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    moved = {k for k in before if torch.is_tensor(before[k]) and not torch.equal(before[k], after[k])}
    assert any(k.startswith("unet.") for k in moved)
    assert not any(k.startswith("autoencoder.") for k in moved)
    if not trainable:
        assert not any(k.startswith("vision_encoder.") for k in moved)

    # inference builds the same network from the same overlay, and loads the trained weights
    infer = parse_configs(["inference.yaml", "evaluate.yaml", "tiny.yaml", overlay]).get_parsed_content("network_def")
    assert infer.fusion == fusion
    infer.load_state_dict(after)
    net.eval()
    infer.eval()
    with torch.no_grad():
        noise = torch.randn(1, 4, 16, 16)
        assert torch.allclose(net(image, noise), infer(image, noise))


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("overlay", sorted(ABLATIONS))
def test_ablation_rows_set_every_switch_under_every_preset(overlay, preset):
    """Each overlay, put after the preset, gives its Table 6 row exactly: fusion (and its U-Net), encoder, lambda and
    the paper's parametrisation (epsilon target, uniform t, no consistency term), in training and in evaluation."""
    fusion, trainable, weight = ABLATIONS[overlay]
    row = overlay[len("ablation_") : -len(".yaml")]
    train = parse_configs(["train.yaml", f"{preset}.yaml", overlay])
    switches = {k: train.get_parsed_content(k) for k in ("fusion", "trainable_encoder", "loss_weight")}
    assert switches == {"fusion": fusion, "trainable_encoder": trainable, "loss_weight": weight}
    assert train.get_parsed_content("network_def#prediction_type") == "epsilon"
    assert train.get_parsed_content("network_def#trainable_encoder") is trainable
    step = train.get_parsed_content("iteration_update")
    assert (step.loss_weight, step.final_step_share, step.consistency_weight) == (weight, 0.0, 0.0)
    assert step.paired_items(8) == 0 and (step.timesteps(4096, 1000, "cpu") == 999).float().mean() < 0.01
    unet = {
        k: train.get(f"unet_def#{k}") and train.get_parsed_content(f"unet_def#{k}")
        for k in ("in_channels", "with_conditioning")
    }
    assert unet == {
        "in_channels": 4 if fusion == "crossattn" else 8,
        "with_conditioning": fusion == "crossattn" or None,
    }
    assert train.get_parsed_content("ckpt_dir").endswith(f"/models/ablation/{row}")
    evaluate = parse_configs(["inference.yaml", "evaluate.yaml", f"{preset}.yaml", overlay])
    assert evaluate.get_parsed_content("fusion") == fusion
    assert evaluate.get_parsed_content("network_def#prediction_type") == "epsilon"
    assert evaluate.get_parsed_content("ddim_scheduler#prediction_type") == "epsilon"
    assert evaluate.get_parsed_content("ckpt_dir").endswith(f"/models/ablation/{row}")
    assert evaluate.get_parsed_content("eval_dir").endswith(f"/eval/ablation/{row}")


def test_fusion_key_is_shared_by_training_and_inference():
    import yaml

    train, infer = (yaml.safe_load((ROOT / "configs" / f).read_text()) for f in ("train.yaml", "inference.yaml"))
    assert train["fusion"] == infer["fusion"] == "concat"
    assert train["network_def"]["fusion"] == infer["network_def"]["fusion"] == "@fusion"
    for overrides, message in (
        (
            {"fusion": "crossattn", "unet_def#with_conditioning": False, "unet_def#cross_attention_dim": None},
            "needs a U-Net",
        ),
        ({"network_def#fusion": "add"}, "fusion must be 'concat' or 'crossattn'"),
    ):
        with pytest.raises(RuntimeError) as err:  # MONAI wraps the constructor's ValueError
            build_tiny_sdseg(**overrides)
        assert message in str(err.value.__cause__)


# ---- bundle runs: stability and reverse sweep on a random-weight tiny model ---------------------------
@pytest.fixture(scope="module")
def bundle_with_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalbundle")
    model = build_tiny_sdseg(seed=0)
    model.scale_factor.fill_(1.0)
    (root / "models").mkdir()
    torch.save({"model": model.state_dict()}, root / "models" / "model.pt")
    return root


def test_stability_bundle_run(bundle_with_model, demo_root):
    root = bundle_with_model
    files = ["inference.yaml", "stability.yaml", "tiny.yaml"]
    args = ["--bundle_root", str(root), "--dataset_dir", str(demo_root / "cvc"), "--num_runs", "3", "--batch_size", "2"]
    proc = run_bundle("stability", files, root, *args)
    saved = json.loads((root / "eval" / "stability" / "stability.json").read_text())
    assert saved["notes"]["runs"] == 3 and saved["notes"]["images"] == 3
    assert set(saved["table"]) == {
        "method",
        *(f"{m}_{k}" for m in ("lpips", "psnr", "ssim", "ms_ssim") for k in ("seg", "score")),
    }
    assert "| method | lpips_seg |" in proc.stdout and "MS-SSIM on 64 px images" in proc.stdout
    assert not (root / "eval" / "stability" / "stability_reference.tmp").exists()  # the reference's scratch is gone


def test_reverse_sweep_reports_one_row_per_setting(bundle_with_model, demo_root):
    root = bundle_with_model
    files = ["inference.yaml", "evaluate.yaml", "reverse_sweep.yaml", "tiny.yaml"]
    proc = run_bundle("reverse_sweep", files, root, "--bundle_root", str(root), "--dataset_dir", str(demo_root / "cvc"))
    out = root / "eval" / "reverse_sweep"
    rows = json.loads((out / "reverse_sweep.json").read_text())
    assert [(r["steps"], r["samples"]) for r in rows] == [(1, 1), (2, 1), (5, 1), (10, 1), (50, 1), (1, 5), (1, 25)]
    assert all(r["n"] == r["slices"] == 3 and 0 <= r["dice"] <= 1 and r["slices_per_s"] > 0 for r in rows)
    assert len((out / "reverse_sweep.csv").read_text().splitlines()) == 1 + 7
    assert (out / "steps10_samples1" / "metrics.csv").exists() and (out / "figures" / "cases.png").exists()
    assert "DDIM 50 steps" in proc.stdout


# ---- pictures ----------------------------------------------------------------------------------
def test_case_grid_and_training_curves(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    case = {
        "name": "a.png",
        "dice": 0.5,
        "image": torch.rand(3, 32, 32) * 2 - 1,
        "label": torch.zeros(1, 48, 64),
        "pred": torch.ones(1, 48, 64),
        "score": torch.rand(1, 48, 64),
    }
    grid = case_grid([case, case], height=60)
    assert grid.shape == (14 + 2 * (14 + 60), 4 * 80, 3) and grid.dtype == np.uint8
    writer = SummaryWriter(str(tmp_path / "logs"))
    for step in range(1, 41):
        writer.add_scalar("train_loss", 2.0 / step, step)
    for epoch in range(1, 5):
        writer.add_scalar("val_mean_dice", 0.2 * epoch, epoch)
    writer.close()
    out = training_curves(str(tmp_path / "logs"), str(tmp_path / "fig" / "curves.png"))
    assert Image.open(out).size == (840, 300)


def test_evaluate_on_images_of_three_sizes_at_batch_4(bundle_with_model, demo_root):
    """Labels stay at each image's own size for the metrics: a batch of differently sized images evaluates, and
    each row of the table is the Dice/IoU of the written mask against the original ground truth."""
    from scripts.data import make_datalist, mask_to_target
    from scripts.metrics import dice_iou

    root, kvasir = bundle_with_model, demo_root / "kvasir"
    sizes = {Image.open(d["image"]).size for d in make_datalist("kvasir", str(kvasir), "test")}
    assert len(sizes) == 3
    out = root / "eval_kvasir"
    overrides = dict(bundle_root=str(root), dataset="kvasir", dataset_dir=str(kvasir), eval_dir=str(out), batch_size=4)
    parse_configs(["inference.yaml", "evaluate.yaml", "tiny.yaml"], **overrides).get_parsed_content("evaluate")
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(rows) == 3
    for name, dice, iou in rows:
        pred = torch.as_tensor(np.array(Image.open(out / "masks" / f"{Path(name).stem}.png")) > 127)[None].float()
        gt = mask_to_target(
            torch.as_tensor(np.array(Image.open(kvasir / "masks" / name).convert("RGB"))).permute(2, 0, 1), "gray"
        )
        assert pred.shape == gt.shape == (1, *reversed(Image.open(kvasir / "images" / name).size))
        assert (float(dice), float(iou)) == pytest.approx(dice_iou(pred, gt), abs=1e-6)
