"""The mask codec: how a mask becomes the mask autoencoder's input, and how its decoder's output becomes
probabilities. The one place that knows; the networks, the training steps, the inferers and the configs call it.

* :class:`BinaryCodec` (``--classes binary``, the paper): a 0/1 mask (B, 1, H, W) -> 3 equal channels in [-1, 1];
  decoded X -> score = channel mean of clamp((X + 1) / 2, 0, 1), (B, 1, H, W); mask = score > 0.5.
* :class:`OneHotCodec` (``--mask_encoding onehot``, the default, chosen beside the colour codec, docs/README.md):
  class indices (B, 1, H, W) -> C one-hot channels in [-1, 1] (background included; the bundle-trained autoencoder
  takes and returns C channels); decoded X -> probabilities softmax(X / 0.25) over the C channels.
* :class:`ColourCodec` (``--mask_encoding colour``; the "maskige" of GSS): each class a fixed RGB code in
  [-1, 1]^3 (:data:`scripts.classes.PALETTE`), so a 3-channel autoencoder (the paper preset's pretrained kl-f8)
  serves C classes; decoded X -> probabilities softmax(-|X - code_c|^2 / 0.1) over the C codes.

Multi-class predictions are the argmax over the C probabilities: a class index, written as its label value.
Every codec is one encoder pass per mask and one decoder pass per prediction, whatever C is.
"""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot
from monai.transforms import AsDiscreted
from torch import nn

from scripts.classes import ClassSet, get_class_set

__all__ = ["mask_to_ae_input", "ae_output_to_score", "BinaryCodec", "OneHotCodec", "ColourCodec", "make_codec"]

ENCODINGS = ("onehot", "colour")


def mask_to_ae_input(mask: torch.Tensor) -> torch.Tensor:
    """A binary mask (B, 1, H, W) in {0, 1} -> the 3-channel [-1, 1] image the autoencoder sees."""
    return (mask.float() * 2 - 1).expand(-1, 3, -1, -1)


def ae_output_to_score(x: torch.Tensor) -> torch.Tensor:
    """Decoded mask (B, 3, H, W) -> probability ("score") map (B, 1, H, W): clamp((x+1)/2), channel mean."""
    return ((x + 1) / 2).clamp(0, 1).mean(dim=1, keepdim=True)


class BinaryCodec(nn.Module):
    """The paper's binary encoding (module docstring). No parameters, no buffers: binary weights are unchanged."""

    name = "binary"
    channels = 3

    def __init__(self, class_set: ClassSet | str = "binary"):
        super().__init__()
        self.class_set = get_class_set(class_set)

    @property
    def multiclass(self) -> bool:
        return False

    @property
    def num_outputs(self) -> int:
        """Channels of :meth:`decode`'s output: 1 (the score) for binary, C otherwise."""
        return 1

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class names for per-class reports and metadata; ``None`` for binary (one Dice per case)."""
        return None

    @property
    def label_values(self) -> tuple[int, ...] | None:
        """Class index -> label value for the writers; ``None`` for binary (0/1 as it is)."""
        return None

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        return mask_to_ae_input(mask)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ae_output_to_score(x)

    def prediction(self, keys) -> AsDiscreted:
        """Probabilities -> the predicted mask (binary: score > 0.5; multi-class: argmax, one channel)."""
        return AsDiscreted(keys=keys, threshold=0.5)

    def validation_postprocessing(self, pred_key: str = "pred", label_key: str = "label") -> AsDiscreted:
        """What MONAI's Dice sees in validation: binary: pred > 0.5; multi-class: both one-hot (argmax for pred)."""
        return AsDiscreted(keys=pred_key, threshold=0.5)

    def extra_state(self) -> str:
        return self.name


class _MultiClassCodec(BinaryCodec):
    temperature = 1.0

    def __init__(self, class_set: ClassSet | str):
        super().__init__(class_set)
        if self.class_set.binary:
            raise ValueError(f"the {self.name} mask encoding is for multi-class --classes, not binary")

    @property
    def multiclass(self) -> bool:
        return True

    @property
    def num_outputs(self) -> int:
        return self.class_set.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.class_set.names

    @property
    def label_values(self) -> tuple[int, ...]:
        return self.class_set.values

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded X (B, channels, H, W) -> class logits (B, C, H, W), whose softmax :meth:`decode` returns."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def onehot(self, mask: torch.Tensor) -> torch.Tensor:
        """Class indices (B, 1, H, W) -> one-hot (B, C, H, W) float."""
        return one_hot(mask.round().long(), self.class_set.num_classes, dtype=torch.float32, dim=1)

    def prediction(self, keys) -> AsDiscreted:
        return AsDiscreted(keys=keys, argmax=True)

    def validation_postprocessing(self, pred_key: str = "pred", label_key: str = "label") -> AsDiscreted:
        c = self.class_set.num_classes
        return AsDiscreted(keys=[pred_key, label_key], argmax=[True, False], to_onehot=[c, c])

    def extra_state(self) -> str:
        return f"{self.name}:{self.class_set.name}"


class OneHotCodec(_MultiClassCodec):
    """C one-hot channels in [-1, 1]; probabilities softmax(X / 0.25)."""

    name = "onehot"
    temperature = 0.25

    @property
    def channels(self) -> int:
        return self.class_set.num_classes

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        return self.onehot(mask) * 2 - 1

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / self.temperature


class ColourCodec(_MultiClassCodec):
    """Each class a fixed RGB code in [-1, 1]^3; probabilities softmax(-squared distance to the codes / 0.1)."""

    name = "colour"
    channels = 3
    temperature = 0.1

    def __init__(self, class_set: ClassSet | str):
        super().__init__(class_set)
        self.register_buffer("colours", self.class_set.colours, persistent=False)

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        index = mask.round().long()[:, 0]  # (B, H, W)
        return self.colours.to(mask.device)[index].permute(0, 3, 1, 2).contiguous()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        colours = self.colours.to(x.device, torch.float32)
        d2 = ((x.float()[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)  # (B, C, H, W)
        return -d2 / self.temperature


def make_codec(classes: str = "binary", encoding: str = "onehot") -> BinaryCodec:
    """The codec of ``--classes`` (``binary``: the paper's; otherwise ``--mask_encoding`` onehot | colour)."""
    class_set = get_class_set(classes)
    if class_set.binary:
        return BinaryCodec(class_set)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown --mask_encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return (OneHotCodec if encoding == "onehot" else ColourCodec)(class_set)
