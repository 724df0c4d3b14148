"""Any Hugging Face vision backbone (``hf:<model id or local path>``) as an image encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from asif.encoders.base import EncoderIdentity, ImageEncoder, l2_normalise
from asif.encoders.device import resolve_device

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


class HFVisionEncoder(ImageEncoder):
    """``pooler_output`` when the model gives one (with trained weights), else the CLS token.

    Conv backbones without a pooler (last_hidden_state of shape (B, C, H, W)) get a spatial mean instead.
    """

    def __init__(self, spec: str, device: str | None = None, batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, AutoModel

        source = spec.removeprefix("hf:")
        if not source:
            raise ValueError("hf: spec needs a model id or local path, e.g. 'hf:facebook/dinov2-small'")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(source)
        model, loading_info = AutoModel.from_pretrained(source, output_loading_info=True)
        self.model = model.eval().to(self.device)
        # A checkpoint saved without its pooler (e.g. DINO ViTs) gets a *randomly initialised* pooler from
        # AutoModel: never use pooler_output then.
        missing = loading_info.get("missing_keys") or ()
        self.pooler_trusted = not any("pooler" in key.split(".") for key in missing)
        # One forward pass on a blank image tells which pooling applies and the output dimension.
        with torch.inference_mode():
            probe, self.pooling = self._forward([Image.new("RGB", (64, 64), (128, 128, 128))], pooling=None)
        preprocessing: dict[str, Any] = {"processor": type(self.processor).__name__, "pooling": self.pooling}
        if not self.pooler_trusted:
            preprocessing["pooler_weights_missing"] = True
        for name in _PROCESSOR_FIELDS:
            if getattr(self.processor, name, None) is not None:
                preprocessing[name] = _jsonable(getattr(self.processor, name))
        self.identity = EncoderIdentity(
            spec=spec, name=source, modality="image", dim=int(probe.shape[1]), preprocessing=preprocessing
        )

    def _forward(self, images: Sequence[Image.Image], pooling: str | None) -> tuple[torch.Tensor, str]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        outputs = self.model(pixel_values=pixel_values)
        pooled = getattr(outputs, "pooler_output", None)
        if pooling is None:
            if pooled is not None and self.pooler_trusted:
                pooling = "pooler_output"
            else:
                pooling = "spatial_mean" if outputs.last_hidden_state.ndim == 4 else "cls"
        if pooling == "pooler_output":
            features = pooled
        elif pooling == "spatial_mean":  # conv backbone without pooler: (B, C, H, W)
            features = outputs.last_hidden_state.mean(dim=(2, 3))
        else:
            features = outputs.last_hidden_state[:, 0]
        return features.reshape(len(images), -1).float(), pooling

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                features, _ = self._forward(batch, self.pooling)
                out[start : start + len(batch)] = features.cpu().numpy()
        return l2_normalise(out)
