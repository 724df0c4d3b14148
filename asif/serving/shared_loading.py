"""Opening a shared model: the counterpart of :func:`asif.serving.loading.open_index` for a model whose pairs,
edit log and label sets live in Milvus collections (:class:`asif.serving.shared_live.SharedLiveModel`)."""

from __future__ import annotations

from typing import Any

from asif.encoders import ImageEncoder, TextEncoder
from asif.math.relrep import DEFAULT_K, DEFAULT_P, Weighting
from asif.serving.live import INLINE_CACHE_BYTES
from asif.serving.model import AsifModel
from asif.serving.shared_live import PENDING_TIMEOUT_S, SharedLiveModel
from asif.state.milvus_meta import MilvusMetadata
from asif.stores.base import StoreError
from asif.stores.milvus_store import MilvusIndex, MilvusStore


def open_shared(
    client: Any,
    prefix: str,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    k: int = DEFAULT_K,
    p: float = DEFAULT_P,
    index: MilvusIndex | None = None,
    inline_cache_bytes: int = INLINE_CACHE_BYTES,
    pending_timeout_s: float = PENDING_TIMEOUT_S,
) -> SharedLiveModel:
    """Open (or create) the shared model ``prefix`` in a Milvus database; the encoders must match its manifest."""
    metadata = MilvusMetadata(client, prefix, text_encoder.identity.dim)
    identities = {"image_encoder": image_encoder.identity.to_dict(), "text_encoder": text_encoder.identity.to_dict()}
    manifest = metadata.get_meta("manifest")
    if manifest is None:
        manifest = {**identities, "defaults": {"k": int(k), "p": float(p)}, "anchors": "caption", "store": "milvus"}
        metadata.set_meta("manifest", manifest)
    for role in ("image_encoder", "text_encoder"):
        if manifest[role] != identities[role]:
            raise StoreError(f"{prefix}: built with {manifest[role]['spec']}, not {identities[role]['spec']}")
    # Where each writer stands, read before any state: edits committed from here on are followed (again, maybe).
    cursors = metadata.writers()
    stores = [
        MilvusStore(client, f"{prefix}_{role}", enc.identity.dim, index)
        for role, enc in (("image", image_encoder), ("text", text_encoder))
    ]
    defaults = manifest.get("defaults", {})
    model = AsifModel(
        *stores,
        k=int(defaults.get("k", k)),
        p=float(defaults.get("p", p)),
        weighting=Weighting.from_defaults(defaults, p),
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        captions=metadata.captions,
    )
    return SharedLiveModel(model, metadata, manifest, cursors, inline_cache_bytes, pending_timeout_s)
