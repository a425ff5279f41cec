"""Speed and memory of SDSeg, measured in one run: ``python -m scripts.tools.benchmark --preset tiny``.

Prints a table and writes JSON (``--out``): per-stage time per slice (vision encoder, U-Net, mask
decoder), bare single-step throughput, end-to-end throughput of the real inference workflow on a demo
dataset (files -> transforms -> networks -> PNG masks) and its ratio to the bare figure, DDIM-10 and
DDIM-50 x 25 samples throughput with the measured and the ideal speed-up of the single step, and the
training step time and peak memory at batch 4. Networks have random weights: speed does not depend on
them.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from scripts.bundle_config import parse_configs
from scripts.io_utils import atomic_write_json
from scripts.sampler import SDSegInferer
from scripts.tools.demo_data import write_demo_datasets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(
    preset: str,
    batch: int,
    repeats: int,
    device: torch.device,
    n_images: int,
    amp_dtype: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    workers: int = 2,
    image_size: int | None = None,
) -> dict:
    """Every figure of the benchmark; ``amp_dtype`` (``bfloat16``/``float16``) runs the mask decoder under
    autocast as the inference config's ``amp`` does; ``channels_last``/``compile`` are the sampler's switches."""
    preset_file = f"{preset}.yaml"
    fast = {"channels_last": channels_last, "compile": compile}
    size_override = {"image_size": image_size} if image_size else {}
    parser = parse_configs(["train.yaml", preset_file], autoencoder_path=None, **size_override)
    parser["network_def"]["autoencoder_path"] = None
    size = parser.get_parsed_content("image_size")
    torch.manual_seed(0)
    model = parser.get_parsed_content("network_def").to(device).eval()
    model.scale_factor.fill_(1.0)
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    res: dict = {"preset": preset, "image_size": size, "batch": batch, "device": str(device), **fast}

    def autocast():  # what the inference config's `amp` does: the mask decoder in amp_dtype (scripts/sampler.py)
        return torch.autocast(device.type, dtype=getattr(torch, amp_dtype or "float32"), enabled=bool(amp_dtype))

    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        z_c = model.encode_image(images)
        z_t = torch.randn((batch, *model.latent_shape(images)), device=device, dtype=z_c.dtype)
        t = torch.full((batch,), model.num_train_timesteps - 1, device=device, dtype=torch.long)
        stage = {
            "encode": _timed(lambda: model.encode_image(images), device, repeats),
            "unet": _timed(lambda: model.model_output(z_t, t, z_c), device, repeats),
        }
        with autocast():
            stage["decode"] = _timed(lambda: model.decode_score(z_t), device, repeats)
    res["stage_ms_per_slice"] = {k: 1000 * v / batch for k, v in stage.items()}
    e, u, d = (stage[k] / batch for k in ("encode", "unet", "decode"))

    def throughput(steps: int, samples: int, imgs: torch.Tensor) -> float:
        inferer = SDSegInferer(num_steps=steps, num_samples=samples, seed=0, **fast)
        n = repeats if steps * samples <= 10 else max(1, repeats // 2)  # DDIM-50 x 25 is slow
        with autocast():
            return imgs.shape[0] / _timed(lambda: inferer(imgs, model), device, n)

    res["single_step_slices_per_s"] = throughput(1, 1, images)
    res["ddim10_slices_per_s"] = throughput(10, 1, images)
    res["ddim50x25_slices_per_s"] = throughput(50, 25, images[:1])
    res["speedup_vs_ddim10"] = {
        "measured": res["single_step_slices_per_s"] / res["ddim10_slices_per_s"],
        "ideal": (e + 10 * u + d) / (e + u + d),
    }
    res["speedup_vs_ddim50x25"] = {
        "measured": res["single_step_slices_per_s"] / res["ddim50x25_slices_per_s"],
        "ideal": (e + 50 * 25 * u + 25 * d) / (e + u + d),
    }
    single = SDSegInferer(seed=0, **fast)

    def bare_batch() -> float:  # seconds of the single step on one ready batch
        with autocast():
            return _timed(lambda: single(images, model), device, repeats=1, warmup=0)

    res["end_to_end"] = end_to_end(
        preset_file, model, batch, device, n_images, amp_dtype, {**fast, **size_override}, workers, bare_batch
    )
    res["training"] = training_step(parser, device)
    res["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": f"{amp_dtype} autocast (mask decoder)" if amp_dtype else "float32",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return res


def end_to_end(
    preset_file: str,
    model,
    batch: int,
    device: torch.device,
    n_images: int,
    amp_dtype,
    overrides: dict,
    workers: int,
    bare,
    repeats: int = 3,
) -> dict:
    """The real inference workflow (configs/inference.yaml) on demo images, weights from ``model``.

    ``slices_per_s`` is the steady-state rate, from the end of the first batch to the end of the run
    (reading, preprocessing in ``workers`` processes, networks, inversion to the input size, PNG writing);
    ``startup_seconds`` is the once-per-run cost before it (checkpoint loading, worker start, first batch).
    ``ratio_to_bare`` divides it by the bare networks' rate (``bare()``: seconds for one batch) on the same
    number of slices, measured in turns with the workflow runs (medians), so that a machine whose speed
    drifts during the benchmark does not bias the ratio.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_datasets(tmp / "demo", n=n_images, seed=0)
        (tmp / "models").mkdir()
        torch.save(model.state_dict(), tmp / "models" / "model.pt")
        parser = parse_configs(
            ["inference.yaml", preset_file],
            ckpt_dir=str(tmp / "models"),
            input_dir=str(tmp / "demo" / "cvc" / "Original"),
            output_dir=str(tmp / "out"),
            batch_size=batch,
            device=str(device),
            num_workers=workers,
            amp=bool(amp_dtype),
            amp_dtype=amp_dtype or "bfloat16",
            **overrides,
        )
        parser["handlers"] = parser["handlers"][:1]  # no progress bar in the timing
        evaluator = parser.get_parsed_content("evaluator")
        marks: dict = {}

        @evaluator.on(Events.ITERATION_COMPLETED(once=1))
        def _first_batch(_):
            _sync(device)
            marks["first"] = time.perf_counter()

        evaluator.run()  # warm-up (also fills the file cache)
        runs, bare_rates = [], []
        n_steady = n_images - min(batch, n_images)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            evaluator.run()
            _sync(device)
            end = time.perf_counter()
            runs.append((n_steady / max(end - marks["first"], 1e-9), end - start, marks["first"] - start))
            bare_seconds = sum(bare() for _ in range(max(1, n_steady // batch)))
            bare_rates.append(max(1, n_steady // batch) * batch / bare_seconds)
        written = len(list((tmp / "out").glob("*.png")))
    steady, seconds, startup = sorted(runs)[len(runs) // 2]
    bare_rate = sorted(bare_rates)[len(bare_rates) // 2]
    return {
        "images": n_images,
        "masks_written": written,
        "workers": workers,
        "seconds": seconds,
        "startup_seconds": startup,
        "slices_per_s": steady,
        "whole_run_slices_per_s": n_images / seconds,
        "bare_slices_per_s_in_turn": bare_rate,
        "ratio_to_bare": steady / bare_rate,
    }


def training_step(parser: ConfigParser, device: torch.device, batch: int = 4) -> dict:
    torch.manual_seed(0)
    model = parser.get_parsed_content("network_def", instantiate=True).to(device).train()
    model.scale_factor.fill_(1.0)
    size = parser.get_parsed_content("image_size")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    image = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        loss = model(image, mask=mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, device, repeats=5, warmup=2)
    out = {
        "batch": batch,
        "seconds_per_step": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    model.latent_cache = {}  # the same masks again: their autoencoder posterior now comes from the cache
    out["seconds_per_step_latent_cache"] = _timed(step, device, repeats=5, warmup=1)
    return out


def report(res: dict) -> str:
    s, t, e2e = res["stage_ms_per_slice"], res["training"], res["end_to_end"]
    lines = [
        f"SDSeg benchmark: preset {res['preset']} ({res['image_size']} px), batch {res['batch']}, {res['device']}, "
        f"torch {res['machine']['torch']}, {res['machine']['threads']} threads, {res['machine']['precision']}, "
        f"channels_last {res['channels_last']}, compile {res['compile']}",
        f"  stage time per slice: encode {s['encode']:.2f} ms, U-Net {s['unet']:.2f} ms, decode {s['decode']:.2f} ms",
        f"  single step (bare networks): {res['single_step_slices_per_s']:.1f} slices/s",
        f"  end-to-end inference workflow: {e2e['slices_per_s']:.1f} slices/s "
        f"({e2e['images']} images, {e2e['workers']} workers) = {e2e['ratio_to_bare']:.2f} x the bare networks "
        f"measured in turn with it ({e2e['bare_slices_per_s_in_turn']:.1f} slices/s); whole run "
        f"{e2e['seconds']:.2f} s incl. {e2e['startup_seconds']:.2f} s start-up",
        f"  DDIM-10: {res['ddim10_slices_per_s']:.2f} slices/s; single-step speed-up "
        f"{res['speedup_vs_ddim10']['measured']:.2f} x (ideal {res['speedup_vs_ddim10']['ideal']:.2f} x, "
        f"{res['speedup_vs_ddim10']['measured'] / res['speedup_vs_ddim10']['ideal']:.2f} of ideal)",
        f"  DDIM-50 x 25 samples: {res['ddim50x25_slices_per_s']:.3f} slices/s; single-step speed-up "
        f"{res['speedup_vs_ddim50x25']['measured']:.0f} x (ideal {res['speedup_vs_ddim50x25']['ideal']:.0f} x)",
        f"  training step (batch {t['batch']}): {t['seconds_per_step']:.3f} s "
        f"({t['seconds_per_step_latent_cache']:.3f} s with the latent cache), peak RSS {t['peak_rss_mb']:.0f} MB"
        + (f", CUDA max allocated {t['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in t else ""),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=96, help="demo images for the end-to-end figure")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes of the end-to-end workflow")
    parser.add_argument("--image_size", type=int, help="input size instead of the preset's (a multiple of 8)")
    parser.add_argument("--amp", choices=["bfloat16", "float16"], help="mask decoder under autocast (CUDA)")
    parser.add_argument("--channels_last", action="store_true", help="channels-last convolutions")
    parser.add_argument("--compile", action="store_true", help="torch.compile the three networks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="eval/benchmark.json")
    args = parser.parse_args()
    res = run(
        args.preset,
        args.batch,
        args.repeats,
        torch.device(args.device),
        args.images,
        args.amp,
        args.channels_last,
        args.compile,
        args.workers,
        args.image_size,
    )
    print(report(res))
    atomic_write_json(args.out, res)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
