"""Export the single-step segmenter for deployment: ``torch.export`` (``.pt2``) or ONNX (``.onnx``).

    python -m scripts.tools.export --config_file "['configs/inference.yaml','configs/tiny.yaml']" \
        --format torch_export --output models/sdseg.pt2        # or: --format onnx --output models/sdseg.onnx

The weights come from ``<ckpt_dir>/model.pt`` (``--ckpt_file`` to change); any other ``--key value`` overrides
the config as in ``python -m monai.bundle run``. The exported program maps an image batch (B, 3, S, S) in
[-1, 1], S = the config's ``image_size``, to a mask batch (B, 1, S, S) in {0, 1} (``--output_type score``:
the probability map). A multi-class model (``--classes all13`` etc., with the ``--mask_encoding`` it was trained
with) gives label maps instead: (B, 1, S, S) float32 holding the label values the bundle writes (the argmax
class, as BTCV ids for ``all13`` / ``transunet8``); ``--output_type score`` gives the C class probabilities
(B, C, S, S). What each value means (``labels``: label value -> class name; ``channels``: probability channel ->
class name) is recorded in the file: ``export.json`` inside the ``.pt2``, metadata properties of the ONNX model
(JSON text), beside ``classes`` and ``mask_encoding``. The batch size is dynamic; the size is fixed because the
noise z_T is part of the program: one draw from ``seed``, reused for every image, exactly as ``SDSegInferer`` draws
it, so the exported program and ``python -m monai.bundle run inference`` give the same masks. TorchScript
(``torch.jit.script``) cannot compile MONAI's diffusion networks on monai 1.6.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from scripts.checkpoints import load_weights, read_checkpoint
from scripts.io_utils import atomic_path

__all__ = ["SingleStepSegmenter", "build_segmenter", "export_program", "save_program", "save_onnx", "main"]

FORMATS = {"torch_export": ".pt2", "onnx": ".onnx"}


class SingleStepSegmenter(nn.Module):
    """SDSeg's single reverse step as one deterministic module: image (B, 3, S, S) -> mask or score (B, 1, S, S);
    a multi-class network (its mask codec has ``label_values``): label map (B, 1, S, S) or scores (B, C, S, S).

    Args:
        network: a trained :class:`scripts.networks.SDSeg` (``fusion`` concat or crossattn).
        image_size: the side S of the images it takes (the preset's ``image_size``).
        seed: seeds z_T, drawn once on the CPU as ``SDSegInferer(seed=seed)`` draws it and kept as a buffer.
        output: ``"mask"`` (score > ``threshold`` as float 0/1; multi-class: the label value of the argmax class, as
            float, as the codec's ``prediction`` and the writer's ``values`` give it) or ``"score"`` (the
            probability map; multi-class: one channel per class).
        threshold: the mask threshold, 0.5 as in the inference config (binary only).
    """

    def __init__(
        self, network: nn.Module, image_size: int, seed: int = 0, output: str = "mask", threshold: float = 0.5
    ):
        super().__init__()
        if output not in ("mask", "score"):
            raise ValueError(f"output must be 'mask' or 'score', got {output!r}")
        self.network = network.eval()
        self.image_size, self.seed, self.output, self.threshold = int(image_size), int(seed), output, float(threshold)
        shape = network.latent_shape(torch.empty(1, 3, self.image_size, self.image_size))
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("noise", noise.to(network.scale_factor.device))
        codec = getattr(network, "codec", None)  # the baseline UNet has none: binary
        self.class_set = codec.class_set if codec is not None and codec.multiclass else None
        if self.class_set is not None:  # class index -> label value (binary: no buffer, its program is unchanged)
            self.register_buffer("label_values", torch.tensor(self.class_set.values, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        score = self.network(image, noise=self.noise)
        if self.output == "score":
            return score
        if self.class_set is not None:
            return self.label_values.to(score.device)[score.argmax(dim=1, keepdim=True)]
        return (score > self.threshold).float()

    def class_settings(self) -> dict:
        """What the output values mean, for the exported file; empty for binary (its record is unchanged)."""
        if self.class_set is None:
            return {}
        return {
            "classes": self.class_set.name,
            "mask_encoding": self.network.codec.name,
            "labels": self.class_set.label_def(),
            "channels": self.class_set.channel_def(),
        }


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_segmenter(
    config_file: str | list[str],
    ckpt_file: str | None = None,
    output: str = "mask",
    device: str = "cpu",
    overrides: dict | None = None,
) -> tuple[SingleStepSegmenter, dict]:
    """The config's ``network_def`` with the trained weights, wrapped; also returns the settings used."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in (overrides or {}).items():
        parser[key] = value
    ckpt = ckpt_file or os.path.join(parser.get_parsed_content("ckpt_dir"), "model.pt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt} (train first, or pass --ckpt_file)")
    network = parser.get_parsed_content("network_def", instantiate=True)
    state = read_checkpoint(ckpt, map_location="cpu")
    state = state.get("model", state)  # CheckpointLoader's {"model": network} or the bare state dict
    load_weights(network, state, ckpt)  # names the file, the preset it seems to come from and the fix
    image_size, seed = int(parser.get_parsed_content("image_size")), int(parser.get_parsed_content("seed"))
    model = SingleStepSegmenter(network.to(device), image_size, seed=seed, output=output).to(device)
    settings = {"checkpoint": str(ckpt), "image_size": image_size, "seed": seed, "output": output}
    return model, {**settings, **model.class_settings()}


def _example(model: SingleStepSegmenter, batch: int = 2) -> torch.Tensor:
    # batch 2: torch.export specialises sizes 0 and 1, so an example of 1 would fix the batch size
    size = model.image_size
    return torch.zeros(batch, 3, size, size, device=model.noise.device)


def export_program(model: SingleStepSegmenter, max_batch: int = 1024) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch dimension (1 to ``max_batch``)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(model.eval(), (_example(model),), dynamic_shapes={"image": {0: batch}})


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``program`` to ``path`` (``.pt2``) atomically; ``extra`` goes in as ``export.json``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f, extra_files={"export.json": json.dumps(extra or {})})
    return Path(path)


def save_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Convert an exported program to ONNX (``torch.onnx.export(dynamo=True)``) and write it atomically.

    Input ``image``, output ``pred``, dynamic batch; ``extra`` goes into the model's metadata properties (strings
    as they are, other values as JSON). Needs ``onnx`` and ``onnxscript`` (requirements-dev.txt).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript (pip install -r requirements-dev.txt): {e}") from e
    onnx_program = torch.onnx.export(program, dynamo=True, output_names=["pred"], verbose=False)
    for key, value in (extra or {}).items():
        onnx_program.model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)  # one file (fine below ONNX's 2 GB limit)
    return Path(path)


def _check(model: SingleStepSegmenter, path: Path, fmt: str) -> str:
    """Eager vs the written file on a random batch of 3: largest difference, differing pixels, time per batch."""
    x = torch.rand(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x.to(model.noise.device)
    if fmt == "torch_export":
        run = torch.export.load(str(path)).module()
    else:
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime not installed: the ONNX file was not checked"
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(image):
            return torch.as_tensor(session.run(["pred"], {"image": image.cpu().numpy()})[0])

    outputs, times = [], []
    with torch.no_grad():
        for f in (model, run):
            f(x)  # warm-up
            t0 = time.perf_counter()
            outputs.append(f(x).to(x.device))
            times.append(time.perf_counter() - t0)
    ref, out = outputs
    diff = (out - ref).abs()
    return (
        f"exported vs eager on a random batch of 3: max difference {diff.max().item():.3g}, "
        f"{int((diff > 0).sum())} pixels differ; {times[0]:.3f} s eager, {times[1]:.3f} s exported"
    )


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m scripts.tools.export",
        description="Export SDSeg's single-step segmenter (image batch -> mask batch) with torch.export or to ONNX. "
        "Extra --key value pairs override the config, as in `python -m monai.bundle run`: a multi-class model needs "
        "the --classes (all13, transunet8, disc_cup) and --mask_encoding (colour, onehot) it was trained with, and "
        "exports label maps (the class's label value per pixel), the class names recorded in the file.",
    )
    p.add_argument(
        "--config_file", default="configs/inference.yaml", help="a config, or a list: \"['a.yaml','b.yaml']\""
    )
    p.add_argument("--format", choices=sorted(FORMATS), default="torch_export")
    p.add_argument("--output", default=None, help="default: sdseg.pt2 or sdseg.onnx next to the checkpoint")
    p.add_argument("--ckpt_file", default=None, help="default: <ckpt_dir>/model.pt")
    p.add_argument(
        "--output_type",
        choices=["mask", "score"],
        default="mask",
        help="mask: 0/1, or the label values of a multi-class model (--classes); score: the probabilities",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip_check", action="store_true", help="do not compare the exported model with eager")
    args, rest = p.parse_known_args(argv)
    if len(rest) % 2 or not all(k.startswith("--") for k in rest[::2]):
        p.error(f"config overrides must be --key value pairs, got {rest}")
    overrides = {k[2:]: _parse_value(v) for k, v in zip(rest[::2], rest[1::2])}
    config_file = _parse_value(args.config_file) if args.config_file.startswith("[") else args.config_file

    model, settings = build_segmenter(config_file, args.ckpt_file, args.output_type, args.device, overrides)
    out = Path(args.output or Path(settings["checkpoint"]).parent / f"sdseg{FORMATS[args.format]}")
    t0 = time.perf_counter()
    program = export_program(model)
    extra = dict(settings, format=args.format, input="image (B, 3, S, S) in [-1, 1]")
    if args.format == "torch_export":
        save_program(program, out, extra)
    else:
        save_onnx(program, out, extra)
    print(f"wrote {out} ({args.format}, {args.output_type}, {time.perf_counter() - t0:.1f} s)")
    if "labels" in settings:
        print(f"label values ({settings['classes']}): {settings['labels']}")
    if not args.skip_check:
        print(_check(model, out, args.format))
    return out


if __name__ == "__main__":
    main()
