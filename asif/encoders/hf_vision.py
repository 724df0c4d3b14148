"""Any Hugging Face vision backbone (``hf:<model id or local path>``) as an image encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from asif.encoders.base import EncoderIdentity, ImageEncoder
from asif.encoders.device import resolve_device
from asif.encoders.runtime import ExportSpec, RuntimeOptions, forward_in_batches, load_forward
from asif.math.normalise import l2_normalise

# Image-processor fields worth recording in the identity (those present on the processor are kept).
_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def _jsonable(value: Any) -> Any:
    """Processor attributes (SizeDict, enums, tuples, numpy scalars) -> plain JSON types."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value"):  # enums such as PILImageResampling
        return _jsonable(value.value)
    if hasattr(value, "__dict__"):  # dataclass-like SizeDict
        return {k: _jsonable(v) for k, v in vars(value).items() if v is not None}
    return str(value)


def _pooled_module(model: Any, pooling: str) -> Any:
    """pixel_values -> pooled features, the pooling chosen at load: the module ONNX Runtime and torch both run."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return _pool(self.model(pixel_values=pixel_values), pooling).flatten(1).float()

    return Pooled().eval()


def _pool(outputs: Any, pooling: str) -> torch.Tensor:
    if pooling == "pooler_output":
        return outputs.pooler_output
    if pooling == "spatial_mean":  # conv backbone without pooler: (B, C, H, W)
        return outputs.last_hidden_state.mean(dim=(2, 3))
    return outputs.last_hidden_state[:, 0]


class HFVisionEncoder(ImageEncoder):
    """``pooler_output`` when the model gives one (with trained weights), else the CLS token.

    Conv backbones without a pooler (last_hidden_state of shape (B, C, H, W)) get a spatial mean instead.
    """

    def __init__(
        self,
        spec: str,
        device: str | None = None,
        batch_size: int = 32,
        runtime: RuntimeOptions = RuntimeOptions(),  # noqa: B008 (frozen dataclass: a safe default)
    ) -> None:
        from transformers import AutoImageProcessor, AutoModel

        source = spec.removeprefix("hf:")
        if not source:
            raise ValueError("hf: spec needs a model id or local path, e.g. 'hf:facebook/dinov2-small'")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(source)
        model, loading_info = AutoModel.from_pretrained(source, output_loading_info=True)
        model = model.eval().to(self.device)
        # A checkpoint saved without its pooler (e.g. DINO ViTs) gets a *randomly initialised* pooler from
        # AutoModel: never use pooler_output then.
        missing = loading_info.get("missing_keys") or ()
        self.pooler_trusted = not any("pooler" in key.split(".") for key in missing)
        # One forward pass on blank images tells which pooling applies and the output dimension.
        blank = self._pixels([Image.new("RGB", (64, 64), (128, 128, 128))] * 2)
        with torch.inference_mode():
            outputs = model(pixel_values=torch.from_numpy(blank).to(self.device, dtype=next(model.parameters()).dtype))
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None and self.pooler_trusted:
            self.pooling = "pooler_output"
        else:
            self.pooling = "spatial_mean" if outputs.last_hidden_state.ndim == 4 else "cls"
        dim = int(_pool(outputs, self.pooling).flatten(1).shape[1])
        preprocessing: dict[str, Any] = {"processor": type(self.processor).__name__, "pooling": self.pooling}
        if not self.pooler_trusted:
            preprocessing["pooler_weights_missing"] = True
        for name in _PROCESSOR_FIELDS:
            if getattr(self.processor, name, None) is not None:
                preprocessing[name] = _jsonable(getattr(self.processor, name))
        self.identity = EncoderIdentity(spec=spec, name=source, modality="image", dim=dim, preprocessing=preprocessing)
        export = ExportSpec({"pixel_values": blank}, {"pixel_values": {0: "batch"}})
        module = _pooled_module(model, self.pooling)
        # the untrusted pooler's random weights do not reach the features: they stay out of the export's cache key
        unused = {f"model.{key}" for key in missing if "pooler" in key.split(".")}
        self.forward = load_forward(module, self.device, self.identity.to_dict(), export, runtime, source, unused)

    def _pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="np")
        return np.asarray(inputs["pixel_values"], dtype=np.float32)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self._pixels([image])[0]

    def encode_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if len(prepared) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = np.stack(list(prepared))
        return l2_normalise(forward_in_batches(self.forward, {"pixel_values": pixels}, self.batch_size))

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_prepared([self.prepare(im) for im in images])
