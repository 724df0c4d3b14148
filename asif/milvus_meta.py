"""Pair metadata, the edit log and label sets in Milvus collections, so that API replicas share all state.

The Milvus counterpart of ``asif.metadata.PairMetadata`` (same methods, same records). Collections, named
``{prefix}_{what}`` (Milvus needs a vector field in every collection: the bookkeeping ones carry a 2-d zero vector):

- ``pairs``: ``id`` (the pair id), ``image`` (reference), ``captions`` (JSON list), ``thumb`` (base64 JPEG on one
  pair per image, '' on the others).
- ``edits``: ``id`` (the edit id: the order replicas follow edits in), ``op`` ('add' or 'delete'), ``pair_id``.
- ``label_sets``: ``name``, ``templates`` (JSON), ``n`` (classes); ``label_rows``: one row per class, ``set``,
  ``row``, ``label`` and the class embedding ``vec``.
- ``meta``: ``key`` -> JSON ``value`` (the manifest: encoders, k, p, anchor mode).

**Ids without coordination.** Pair and edit ids are ``ms << 22 | tag << 6 | counter``: the milliseconds since
2024, a 16-bit tag drawn at random by each process, and a counter (64 per millisecond; the clock waits past a full
one). They are unique unless two processes draw the same tag and allocate in the same millisecond with the same
counter, and they grow with time, which is what replicas follow edits by (``edits_after``). Every read is Strong.
``asif build --store milvus`` numbers the pairs it loads 0..n-1, below every clock id.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from asif.metadata import Edit, NewPair, PairRecord, StoredLabelSet
from asif.stores.milvus_store import CHUNK, STRONG, MilvusIndex, all_ids, create_collection, ids_expr

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MAX_VARCHAR = 65_535


class IdClock:
    """Time-ordered 63-bit ids: ``ms << 22 | tag << 6 | counter`` (see the module doc)."""

    def __init__(self, tag: int | None = None) -> None:
        self.tag = secrets.randbelow(1 << 16) if tag is None else int(tag) & 0xFFFF
        self._lock = threading.Lock()
        self._ms = 0
        self._count = 0

    def take(self, n: int) -> list[int]:
        out = []
        with self._lock:
            for _ in range(n):
                now = int(time.time() * 1000) - EPOCH_MS
                if now > self._ms:
                    self._ms, self._count = now, 0
                elif self._count >= 64:  # this millisecond is used up (or the clock went back): the next one
                    self._ms, self._count = self._ms + 1, 0
                out.append(self._ms << 22 | self.tag << 6 | self._count)
                self._count += 1
        return out

    @staticmethod
    def ms_of(ident: int) -> int:
        return int(ident) >> 22


def _quote(text: str) -> str:
    return json.dumps(text)  # a Milvus string literal: double quotes, backslash escapes


PREFIX_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,40}$"  # a Milvus collection name, less the suffixes below
SHARED = ("image", "text", "pairs", "edits", "label_sets", "label_rows", "meta")  # collections of one model


def shared_collections(client: Any, prefix: str) -> list[str]:
    """The collections of the shared model ``prefix`` that exist in this database."""
    return [f"{prefix}_{what}" for what in SHARED if client.has_collection(f"{prefix}_{what}")]


def drop_shared(client: Any, prefix: str) -> None:
    """Drop every collection of the shared model ``prefix`` (a rebuild, or a build that was interrupted)."""
    for name in shared_collections(client, prefix):
        client.drop_collection(name)


def read_manifest(client: Any, prefix: str) -> dict[str, Any] | None:
    """The manifest of the shared model ``prefix`` (encoders, defaults), or None when there is none yet."""
    name = f"{prefix}_meta"
    if not client.has_collection(name):
        return None
    client.load_collection(name)
    rows = client.query(name, filter='key == "manifest"', output_fields=["value"], consistency_level=STRONG)
    return json.loads(rows[0]["value"]) if rows else None


class MilvusMetadata:
    """Thread-safe metadata over one Milvus database (a server URI, or a milvus-lite file)."""

    def __init__(self, client: Any, prefix: str, text_dim: int, clock: IdClock | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.text_dim = int(text_dim)
        self.clock = clock or IdClock()
        self._create()

    def _name(self, what: str) -> str:
        return f"{self.prefix}_{what}"

    def _create(self) -> None:
        from pymilvus import DataType

        def collection(what: str, fields: list[tuple[str, Any, dict]], vec_dim: int = 2) -> None:
            name = self._name(what)
            if not self.client.has_collection(name):
                create_collection(self.client, name, fields, vec_dim, MilvusIndex("FLAT"))
            self.client.load_collection(name)

        text = {"max_length": MAX_VARCHAR}
        collection(
            "pairs",
            [("id", DataType.INT64, {"is_primary": True}), ("image", DataType.VARCHAR, {"max_length": 1024}),
             ("captions", DataType.VARCHAR, text), ("thumb", DataType.VARCHAR, text)],
        )  # fmt: skip
        collection(
            "edits",
            [("id", DataType.INT64, {"is_primary": True}), ("op", DataType.VARCHAR, {"max_length": 8}),
             ("pair_id", DataType.INT64, {})],
        )  # fmt: skip
        collection(
            "label_sets",
            [("name", DataType.VARCHAR, {"is_primary": True, "max_length": 128}),
             ("templates", DataType.VARCHAR, text), ("n", DataType.INT64, {})],
        )  # fmt: skip
        collection(
            "label_rows",
            [("id", DataType.INT64, {"is_primary": True}), ("set", DataType.VARCHAR, {"max_length": 128}),
             ("row", DataType.INT64, {}), ("label", DataType.VARCHAR, {"max_length": 4096})],
            vec_dim=self.text_dim,
        )  # fmt: skip
        collection("meta", [("key", DataType.VARCHAR, {"is_primary": True, "max_length": 128}),
                            ("value", DataType.VARCHAR, text)])  # fmt: skip

    def _query(self, what: str, filter: str, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
        kw = {"limit": limit} if limit is not None else {}
        return list(
            self.client.query(self._name(what), filter=filter, output_fields=fields, consistency_level=STRONG, **kw)
        )

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""

    # -- manifest --------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self.client.upsert(self._name("meta"), [{"key": key, "value": json.dumps(value), "vec": [0.0, 0.0]}])

    def get_meta(self, key: str) -> Any:
        rows = self._query("meta", f"key == {_quote(key)}", ["value"])
        return json.loads(rows[0]["value"]) if rows else None

    # -- pairs -------------------------------------------------------------------------------------------------
    def _records(self, filter: str, limit: int | None = None) -> list[PairRecord]:
        rows = self._query("pairs", filter, ["id", "image", "captions"], limit)
        return [PairRecord(int(r["id"]), r["image"], json.loads(r["captions"])) for r in rows]

    def get(self, pair_id: int) -> PairRecord | None:
        rows = self._records(f"id == {int(pair_id)}")
        return rows[0] if rows else None

    def captions(self, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), CHUNK):
            for rec in self._records(ids_expr("id", ids[start : start + CHUNK])):
                out[rec.id] = rec.caption
        return out

    def thumbnail(self, image: str) -> bytes | None:
        rows = self._query("pairs", f"image == {_quote(image)} and thumb != ''", ["thumb"], limit=1)
        return base64.b64decode(rows[0]["thumb"]) if rows else None

    def count(self) -> int:
        return int(self._query("pairs", "", ["count(*)"])[0]["count(*)"])

    def ids(self) -> list[int]:
        return all_ids(self.client, self._name("pairs"))

    def page(self, after: int = -1, limit: int = 100) -> list[PairRecord]:
        # Milvus returns a filter's rows in no set order: take the ids above `after`, then the first `limit`.
        ids = sorted(int(r["id"]) for r in self._query("pairs", f"id > {int(after)}", ["id"], limit=16_384))
        wanted = ids[: int(limit)]
        return sorted(self._records(ids_expr("id", wanted)), key=lambda r: r.id) if wanted else []

    # -- the edit log ------------------------------------------------------------------------------------------
    def insert_pairs(self, rows: Iterable[tuple[int, str, Sequence[str], bytes | None]]) -> int:
        """Write pair rows ``(id, image reference, captions, thumbnail JPEG or None)`` in chunks; returns how many.

        One thumbnail per image is enough (``thumbnail`` finds any pair's; a delete moves it to a pair that stays).
        """
        batch: list[dict[str, Any]] = []
        written = 0
        for pid, image, captions, thumbnail in rows:
            thumb = base64.b64encode(thumbnail).decode() if thumbnail else ""
            text = json.dumps(list(captions), ensure_ascii=False)
            if len(thumb) > MAX_VARCHAR or len(text.encode()) > MAX_VARCHAR:
                raise ValueError(f"pair {pid}: captions or thumbnail too large for Milvus ({MAX_VARCHAR} bytes)")
            batch.append({"id": int(pid), "image": image[:1024], "captions": text, "thumb": thumb, "vec": [0.0, 0.0]})
            if len(batch) == CHUNK:
                self.client.insert(self._name("pairs"), batch)
                written, batch = written + len(batch), []
        if batch:
            self.client.insert(self._name("pairs"), batch)
            written += len(batch)
        return written

    def log_add(self, pairs: Sequence[NewPair]) -> list[int]:
        """Assign ids and record the pairs (rows with thumbnails; the edits replicas follow come later)."""
        ids = self.clock.take(len(pairs))
        self.insert_pairs((pid, p.image, p.captions, p.thumbnail) for pid, p in zip(ids, pairs, strict=True))
        return ids

    def record_edits(self, op: str, pair_ids: Sequence[int]) -> list[int]:
        """Append edits (once the stores hold them) for other replicas to follow; returns their edit ids."""
        seqs = self.clock.take(len(pair_ids))
        rows = [{"id": s, "op": op, "pair_id": int(p), "vec": [0.0, 0.0]} for s, p in zip(seqs, pair_ids, strict=True)]
        if rows:
            self.client.insert(self._name("edits"), rows)
        return seqs

    def log_delete(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            self._keep_thumbnails(chunk)
            self.client.delete(self._name("pairs"), ids=chunk)

    def _keep_thumbnails(self, leaving: list[int]) -> None:
        """Thumbnails on pairs about to go move to a pair of the same image that stays (if any)."""
        fields = ["id", "image", "captions", "thumb"]
        going = set(leaving)
        for row in self._query("pairs", f"{ids_expr('id', leaving)} and thumb != ''", fields):
            others = self._query("pairs", f"image == {_quote(row['image'])}", fields, limit=len(going) + 1)
            heir = next((r for r in others if int(r["id"]) not in going), None)
            if heir is not None and not heir["thumb"]:
                self.client.upsert(self._name("pairs"), [{**heir, "thumb": row["thumb"], "vec": [0.0, 0.0]}])

    def revert_add(self, ids: Sequence[int]) -> None:
        """An add whose store write failed: its pair rows go (no edit was recorded for it)."""
        self.log_delete(ids)

    def edits_after(self, seq: int, upto: int | None = None) -> list[Edit]:
        """Edits with ``seq < id <= upto``, in id order (vectors are in the stores, not here)."""
        top = 2**63 - 1 if upto is None else int(upto)
        rows = self._query("edits", f"id > {int(seq)} and id <= {top}", ["id", "op", "pair_id"], limit=16_384)
        return sorted((Edit(int(r["id"]), r["op"], int(r["pair_id"]), None, None) for r in rows), key=lambda e: e.seq)

    def last_seq(self) -> int:
        # The newest edit: ids grow with time, so look at the last minute first, then everywhere.
        recent = (max(0, int(time.time() * 1000) - EPOCH_MS - 60_000)) << 22
        for filter in (f"id > {recent}", "id >= 0"):
            rows = self._query("edits", filter, ["id"], limit=16_384)
            if rows:
                return max(int(r["id"]) for r in rows)
        return 0

    def compact_log(self, upto_seq: int) -> None:
        """Edits stay: replicas follow them (they are a few bytes each)."""

    # -- label sets --------------------------------------------------------------------------------------------
    def put_label_set(self, stored: StoredLabelSet) -> None:
        emb = np.ascontiguousarray(stored.embeddings, dtype=np.float32)
        self.delete_label_set(stored.name)
        rows = [
            {"id": rid, "set": stored.name, "row": r, "label": label[:4096], "vec": emb[r].tolist()}
            for r, (rid, label) in enumerate(zip(self.clock.take(len(stored.classes)), stored.classes, strict=True))
        ]
        for start in range(0, len(rows), CHUNK):
            self.client.insert(self._name("label_rows"), rows[start : start + CHUNK])
        header = {"name": stored.name, "templates": json.dumps(stored.templates, ensure_ascii=False),
                  "n": len(stored.classes), "vec": [0.0, 0.0]}  # fmt: skip
        self.client.upsert(self._name("label_sets"), [header])  # last: a set is listed once its rows are in

    def label_sets(self) -> list[StoredLabelSet]:
        out = []
        for head in sorted(self._query("label_sets", "", ["name", "templates", "n"], limit=16_384),
                           key=lambda h: h["name"]):  # fmt: skip
            rows = self._query("label_rows", f"set == {_quote(head['name'])}", ["row", "label", "vec"], limit=16_384)
            if len(rows) != int(head["n"]):
                continue  # being written by another replica
            rows.sort(key=lambda r: int(r["row"]))
            emb = np.asarray([r["vec"] for r in rows], dtype=np.float32).reshape(len(rows), self.text_dim)
            out.append(StoredLabelSet(head["name"], [r["label"] for r in rows], json.loads(head["templates"]), emb))
        return out

    def delete_label_set(self, name: str) -> bool:
        found = bool(self._query("label_sets", f"name == {_quote(name)}", ["name"]))
        self.client.delete(self._name("label_sets"), filter=f"name == {_quote(name)}")
        self.client.delete(self._name("label_rows"), filter=f"set == {_quote(name)}")
        return found
