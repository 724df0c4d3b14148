"""Open an index folder as a ready ASIF model: stores, metadata, and (optionally) encoders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asif.encoders import ImageEncoder, RuntimeOptions, TextEncoder, load_image_encoder, load_text_encoder
from asif.encoders.quantize import load_quantized
from asif.math.relrep import DEFAULT_K, DEFAULT_P, Weighting
from asif.serving.model import AsifModel
from asif.state.metadata import PairMetadata
from asif.state.persist import IndexFolder, check_encoders, load_index_folder, read_manifest


@dataclass
class LoadedIndex:
    folder: IndexFolder
    model: AsifModel
    metadata: PairMetadata


def open_index(
    path: str | Path,
    image_encoder: ImageEncoder | str | None = None,
    text_encoder: TextEncoder | str | None = None,
    load_encoders: bool = True,
    device: str | None = None,
    verify: bool = True,
    runtime: RuntimeOptions | str | None = None,
) -> LoadedIndex:
    """Load an index folder. Encoders default to the specs in its manifest; others must match it.

    An index built with ``--quantize int8`` runs its image encoder on the int8 graph it keeps
    (``encoders/image-int8.onnx``), on ONNX Runtime only.

    Raises :class:`asif.state.persist.EncoderMismatchError` when the given encoders are not the ones
    the index was built with, :class:`asif.encoders.quantize.QuantizeError` when an int8 index's
    encoder cannot run (torch asked for, or its file missing or changed), and
    :class:`asif.state.persist.IndexFolderError` for a broken folder.
    """
    manifest = read_manifest(Path(path))
    if load_encoders:
        if image_encoder is None or isinstance(image_encoder, str):
            image_encoder = load_image_encoder(
                image_encoder or manifest["image_encoder"]["spec"], device, None, runtime
            )
            load_quantized(image_encoder, Path(path), manifest["image_encoder"])  # an int8 index: its own graph
        if text_encoder is None or isinstance(text_encoder, str):
            text_encoder = load_text_encoder(text_encoder or manifest["text_encoder"]["spec"], device, None, runtime)
    image_obj = image_encoder if isinstance(image_encoder, ImageEncoder) else None
    text_obj = text_encoder if isinstance(text_encoder, TextEncoder) else None
    check_encoders(manifest, image_obj.identity if image_obj else None, text_obj.identity if text_obj else None)
    folder = load_index_folder(Path(path), verify=verify)
    metadata = PairMetadata(folder.metadata_path)
    defaults = manifest.get("defaults", {})
    model = AsifModel(
        folder.image_store,
        folder.text_store,
        k=int(defaults.get("k", DEFAULT_K)),
        p=float(defaults.get("p", DEFAULT_P)),
        weighting=Weighting.from_defaults(defaults),
        image_encoder=image_obj,
        text_encoder=text_obj,
        captions=metadata.captions,
    )
    return LoadedIndex(folder, model, metadata)
