"""Throughput of volume inference against the bare networks: ``python -m scripts.tools.benchmark_volumes --benchmark``.

Prints, as JSON, the slices/s of the bare networks on ready slice batches, of :class:`VolumeInferer` on
preprocessed volumes and of the whole volume chain (load, preprocess, infer, ``Invertd``, threshold; no
writing), and their ratios to the bare figure. Networks have random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time

from monai.transforms import AsDiscreted, Compose, Invertd

from scripts.bundle_config import parse_configs
from scripts.sampler import SDSegInferer
from scripts.volumes.datalist import DATASETS, make_datalist
from scripts.volumes.inference import VolumeInferer
from scripts.volumes.transforms import volume_transforms

__all__ = ["benchmark"]


def benchmark(
    dataset_dir: str, dataset: str = "btcv", preset: str = "tiny", batch_size: int = 8, repeats: int = 3
) -> dict:
    """Slices/s of the bare networks (``SDSegInferer`` on ready slice batches) vs volume inference of the
    same volumes: the volume chain, :class:`VolumeInferer`, ``Invertd`` to the input grid and threshold
    (no file writing), and the same without loading (``VolumeInferer`` on preprocessed volumes)."""
    parser = parse_configs(["train.yaml", f"{preset}.yaml"])
    parser["network_def"]["autoencoder_path"] = None
    net = parser.get_parsed_content("network_def").eval()
    net.scale_factor.fill_(1.0)
    image_size, window = parser["image_size"], DATASETS[dataset]["window"]
    items = make_datalist(dataset, dataset_dir, "all")
    pre = volume_transforms(dataset, window, image_size, resample_label=False)
    post = Compose([Invertd("pred", pre, orig_keys="image", nearest_interp=False), AsDiscreted("pred", threshold=0.5)])
    inner = SDSegInferer(seed=0)
    vol_inferer = VolumeInferer(inner, batch_size)
    volumes = [pre({"image": d["image"]})["image"] for d in items]
    n = sum(v.shape[-1] for v in volumes)
    slices = [v.as_tensor().permute(3, 0, 1, 2).contiguous() for v in volumes]

    def bare():
        for s in slices:
            for i in range(0, s.shape[0], batch_size):
                inner(s[i : i + batch_size], net)

    def inferer_only():
        for v in volumes:
            vol_inferer(v[None], net)

    def end_to_end():
        for d in items:
            x = pre({"image": d["image"]})
            x["pred"] = vol_inferer(x["image"][None], net)[0]
            post(x)

    runs = {"bare": bare, "inferer": inferer_only, "end_to_end": end_to_end}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats + 1):  # interleaved, so that load from other processes hits all alike; best time
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    out = {"slices": n, **{f"{name}_slices_per_s": n / t for name, t in best.items()}}
    out["inferer_ratio"] = out["inferer_slices_per_s"] / out["bare_slices_per_s"]
    out["end_to_end_ratio"] = out["end_to_end_slices_per_s"] / out["bare_slices_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", help="measure volume inference vs the bare networks")
    parser.add_argument("--dataset", default="btcv", choices=sorted(DATASETS))
    parser.add_argument("--dataset_dir", default=None, help="default: data/demo/<dataset>")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    if not args.benchmark:
        parser.print_help()
        return
    result = benchmark(args.dataset_dir or f"data/demo/{args.dataset}", args.dataset, args.preset, args.batch_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
