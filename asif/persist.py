"""The index folder: manifest, the two anchor indices and the pair metadata, written atomically.

Layout (``g`` = generation number, bumped by every save)::

    manifest.json            the commit point: names the files of the current generation
    image-g000001.faiss      image anchor index (+ image-g000001.refine.npz when re-ranking: the
                             exact vectors and the groups of pairs sharing one vector)
    text-g000001.faiss       caption anchor index (+ .refine.npz)
    pairs.sqlite             pair metadata (id, image reference, captions, thumbnails)

A save writes the new generation's files (temp name, fsync, rename), then replaces
``manifest.json`` atomically, then deletes files of older generations. A crash at any point
leaves a folder whose manifest names complete files: the old state or the new one. Every
index file's SHA-256 is in the manifest and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asif import __version__
from asif.encoders.base import EncoderIdentity
from asif.store import AnchorStore, IndexSpec, refine_path

FORMAT = "asif-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "pairs.sqlite"
_GEN_FILE = re.compile(r"^(image|text)-g(\d{6})(\.faiss|\.refine\.npz)$")


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
    image_store: AnchorStore
    text_store: AnchorStore

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
    folder: Path, image_store: AnchorStore, text_store: AnchorStore, manifest: dict[str, Any]
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
    write_json_atomic(folder / MANIFEST, out)
    remove_stale_generations(folder, generation)
    return out


def remove_stale_generations(folder: Path, keep: int) -> None:
    for path in Path(folder).iterdir():
        m = _GEN_FILE.match(path.name)
        if (m and int(m.group(2)) != keep) or path.name.endswith((".faiss.tmp", ".npz.tmp")):
            path.unlink(missing_ok=True)


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
    stores: dict[str, AnchorStore] = {}
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
            stores[role] = AnchorStore.read(path, int(entry["dim"]), spec)
        except (RuntimeError, ValueError) as exc:
            raise IndexFolderError(f"cannot read {path}: {exc}") from exc
    if stores["image"].ntotal != stores["text"].ntotal:
        raise IndexFolderError("image and caption indices hold different numbers of anchors")
    return IndexFolder(folder, manifest, stores["image"], stores["text"])
