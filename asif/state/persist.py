"""The index folder: manifest, the two anchor indices and the pair metadata, written atomically.

Layout (``g`` = generation number, bumped by every full save)::

    manifest.json                the commit point: names the files of the current generation
    image-g000001.faiss          image anchor index (+ image-g000001.refine.npz when re-ranking: the
                                 exact vectors and the groups of pairs sharing one vector)
    text-g000001.faiss           caption anchor index (+ .refine.npz)
    delta-g000001-0001.npz       edits since the generation's base files (pairs added, with both
                                 vectors; pairs deleted), in the order the manifest lists them
    pairs.sqlite                 pair metadata (id, image reference, captions, thumbnails, edit log)

A full save (:func:`save_index_folder`) writes the new generation's files (temp name, fsync,
rename), then replaces ``manifest.json`` atomically, then deletes files of older generations. A
delta save (:func:`write_delta`) writes one delta file and a manifest that lists it: it costs what
changed, not the collection. Loading applies the deltas over the base, in order.
:func:`compact_index_folder` folds the deltas into a new base generation, working from the files
alone (never from a live model's memory). A crash at any point leaves a folder whose manifest names
complete files: the old state or the new one. Every file's SHA-256 is in the manifest and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asif import __version__
from asif.encoders.base import EncoderIdentity
from asif.state.metadata import Edit
from asif.stores import FaissStore, IndexSpec, refine_path

FORMAT = "asif-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "pairs.sqlite"
_GEN_FILE = re.compile(r"^(image|text)-g(\d{6})(\.faiss|\.refine\.npz)$")
_DELTA_FILE = re.compile(r"^delta-g(\d{6})-\d{4,}\.npz$")


class IndexFolderError(ValueError):
    """The folder is not a loadable ASIF index (missing, corrupt, incompatible)."""


class EncoderMismatchError(IndexFolderError):
    """The encoders offered do not match those the index was built with."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class IndexFolder:
    """What a loaded index folder holds."""

    path: Path
    manifest: dict[str, Any]
    image_store: FaissStore
    text_store: FaissStore

    @property
    def image_identity(self) -> EncoderIdentity:
        return EncoderIdentity.from_dict(self.manifest["image_encoder"])

    @property
    def text_identity(self) -> EncoderIdentity:
        return EncoderIdentity.from_dict(self.manifest["text_encoder"])

    @property
    def metadata_path(self) -> Path:
        return self.path / self.manifest.get("metadata", METADATA)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexFolderError(f"{folder} is not an ASIF index folder: {MANIFEST} not found (run `asif build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFolderError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise IndexFolderError(f"{path}: not an ASIF manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFolderError(
            f"{path}: format version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest


def check_encoders(manifest: dict[str, Any], image: EncoderIdentity | None, text: EncoderIdentity | None) -> None:
    """Raise EncoderMismatchError unless the given encoders are the ones the index was built with."""
    for role, offered in (("image", image), ("text", text)):
        if offered is None:
            continue
        built = EncoderIdentity.from_dict(manifest[f"{role}_encoder"])
        same = (built.name, built.dim, built.preprocessing) == (offered.name, offered.dim, offered.preprocessing)
        if not same:
            raise EncoderMismatchError(
                f"the index was built with {role} encoder {built.name!r} ({built.dim}-d, spec {built.spec!r}), "
                f"but {offered.name!r} ({offered.dim}-d, spec {offered.spec!r}) was given; "
                f"use the same encoder or rebuild the index"
            )


def save_index_folder(
    folder: Path, image_store: FaissStore, text_store: FaissStore, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write a new generation of both indices and commit it by replacing the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(folder) if (folder / MANIFEST).exists() else {}
    generation = int(previous.get("generation", 0)) + 1
    indices: dict[str, Any] = {}
    for role, store in (("image", image_store), ("text", text_store)):
        target = folder / f"{role}-g{generation:06d}.faiss"
        written = store.write(target)
        indices[role] = {
            "file": target.name,
            "spec": store.spec.to_dict(),
            "dim": store.dim,
            "ntotal": store.ntotal,
            "sha256": {p.name: sha256_file(p) for p in written},
        }
    fsync_dir(folder)
    out = dict(manifest)
    out.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        asif_version=__version__,
        generation=generation,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        indices=indices,
    )
    out.setdefault("metadata", METADATA)
    out["deltas"] = []  # the base holds everything
    out.setdefault("counts", {})
    out["counts"] = dict(out["counts"], pairs=image_store.ntotal)
    write_json_atomic(folder / MANIFEST, out)
    remove_stale_generations(folder, generation)
    return out


def remove_stale_generations(folder: Path, keep: int) -> None:
    """After a full save: delete files of other generations, every delta file (the base holds their edits), and
    temp files."""
    for path in Path(folder).iterdir():
        m = _GEN_FILE.match(path.name)
        delta = _DELTA_FILE.match(path.name)
        if (m and int(m.group(2)) != keep) or delta or path.name.endswith((".faiss.tmp", ".npz.tmp")):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Delta:
    """The net effect of consecutive edits: pairs added (with vectors) and earlier pairs deleted."""

    add_ids: np.ndarray  # (a,) int64
    add_image: np.ndarray  # (a, d_image) float32
    add_text: np.ndarray  # (a, d_text) float32
    delete_ids: np.ndarray  # (r,) int64, pairs that existed before these edits
    to_seq: int  # the last edit-log sequence number these edits include

    def __len__(self) -> int:
        return len(self.add_ids) + len(self.delete_ids)


def write_delta(folder: Path, manifest: dict[str, Any], delta: Delta) -> dict[str, Any]:
    """Append a delta file to the current generation and commit a manifest listing it; returns the manifest.

    Costs what the delta holds: the base files are not touched.
    """
    folder = Path(folder)
    deltas = list(manifest.get("deltas", []))
    if len(delta) == 0:  # the edits cancel out (pairs added and deleted again): only the log position moves
        out = dict(manifest, applied_seq=int(delta.to_seq))
        write_json_atomic(folder / MANIFEST, out)
        return out
    name = f"delta-g{int(manifest['generation']):06d}-{len(deltas) + 1:04d}.npz"
    path = folder / name
    tmp = path.with_name(name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            add_ids=np.asarray(delta.add_ids, dtype=np.int64),
            add_image=np.asarray(delta.add_image, dtype=np.float32),
            add_text=np.asarray(delta.add_text, dtype=np.float32),
            delete_ids=np.asarray(delta.delete_ids, dtype=np.int64),
        )
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)
    deltas.append(
        {"file": name, "sha256": sha256_file(path), "adds": len(delta.add_ids), "deletes": len(delta.delete_ids)}
    )
    out = dict(manifest)
    pairs = int(out.get("counts", {}).get("pairs", 0)) + len(delta.add_ids) - len(delta.delete_ids)
    out.update(
        deltas=deltas,
        applied_seq=int(delta.to_seq),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        counts=dict(out.get("counts", {}), pairs=pairs),
    )
    write_json_atomic(folder / MANIFEST, out)
    return out


def delta_pairs(manifest: dict[str, Any]) -> int:
    """Pairs added or deleted by the deltas a manifest lists."""
    return sum(int(d["adds"]) + int(d["deletes"]) for d in manifest.get("deltas", []))


def _apply_delta(path: Path, image_store: FaissStore, text_store: FaissStore) -> None:
    with np.load(path, allow_pickle=False) as z:
        add_ids, add_image, add_text, delete_ids = z["add_ids"], z["add_image"], z["add_text"], z["delete_ids"]
    if not (len(add_ids) == len(add_image) == len(add_text)):
        raise IndexFolderError(f"{path}: {len(add_ids)} ids for {len(add_image)} / {len(add_text)} vectors")
    for store in (image_store, text_store):
        store.remove(delete_ids)
    new = ~image_store.contains(add_ids)
    if new.any():
        # One call per delta: identical image vectors in it (one image, several captions) are grouped.
        image_store.add(add_ids[new], add_image[new])
        text_store.add(add_ids[new], add_text[new])


def compact_index_folder(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Fold the deltas into a new base generation, from the files alone; returns the manifest.

    Holds a second copy of the stores in memory while it runs; the folder stays loadable throughout.
    """
    loaded = load_index_folder(Path(folder), verify=verify)
    if not loaded.manifest.get("deltas"):
        return loaded.manifest
    return save_index_folder(Path(folder), loaded.image_store, loaded.text_store, dict(loaded.manifest))


def load_index_folder(
    folder: Path,
    image: EncoderIdentity | None = None,
    text: EncoderIdentity | None = None,
    verify: bool = True,
) -> IndexFolder:
    """Load both stores, checking encoder identities and file checksums."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_encoders(manifest, image, text)
    stores: dict[str, FaissStore] = {}
    for role in ("image", "text"):
        entry = manifest["indices"][role]
        spec = IndexSpec.from_dict(entry["spec"])
        path = folder / entry["file"]
        files = [path, refine_path(path)] if spec.refine else [path]
        for f in files:
            if not f.is_file():
                raise IndexFolderError(f"{f} is missing (named by {MANIFEST})")
            expected = entry["sha256"].get(f.name)
            if verify and expected and sha256_file(f) != expected:
                raise IndexFolderError(f"{f} is corrupt: its SHA-256 does not match {MANIFEST}")
        try:
            stores[role] = FaissStore.read(path, int(entry["dim"]), spec)
        except (RuntimeError, ValueError) as exc:
            raise IndexFolderError(f"cannot read {path}: {exc}") from exc
    for entry in manifest.get("deltas", []):
        path = folder / entry["file"]
        if not path.is_file():
            raise IndexFolderError(f"{path} is missing (named by {MANIFEST})")
        if verify and sha256_file(path) != entry["sha256"]:
            raise IndexFolderError(f"{path} is corrupt: its SHA-256 does not match {MANIFEST}")
        try:
            _apply_delta(path, stores["image"], stores["text"])
        except (OSError, KeyError, ValueError) as exc:
            raise IndexFolderError(f"cannot apply {path}: {exc}") from exc
    if stores["image"].ntotal != stores["text"].ntotal:
        raise IndexFolderError("image and caption indices hold different numbers of anchors")
    return IndexFolder(folder, manifest, stores["image"], stores["text"])


def net_delta(edits: Sequence[Edit], to_seq: int) -> Delta:
    """Edit-log entries -> their net effect (pair ids are never reused, so order only matters within an id)."""
    added: dict[int, Edit] = {}
    deleted: list[int] = []
    for e in edits:
        if e.op == "add":
            added[e.pair_id] = e
        elif e.pair_id in added:
            del added[e.pair_id]
        else:
            deleted.append(e.pair_id)
    adds = list(added.values())
    return Delta(
        add_ids=np.array([e.pair_id for e in adds], dtype=np.int64),
        add_image=np.stack([e.image_vec for e in adds]) if adds else np.zeros((0, 0), np.float32),
        add_text=np.stack([e.text_vec for e in adds]) if adds else np.zeros((0, 0), np.float32),
        delete_ids=np.array(sorted(set(deleted)), dtype=np.int64),
        to_seq=to_seq,
    )
