"""Pair metadata, the edit log and label sets in Milvus collections, so that API replicas share all state.

The Milvus counterpart of ``asif.state.metadata.PairMetadata``. Collections, named ``{prefix}_{what}`` (Milvus needs a
vector field in every collection: the bookkeeping ones carry a 2-d zero vector):

- ``pairs``: ``id`` (the pair id), ``image`` (reference), ``captions`` (JSON list), ``thumb`` (base64 JPEG on one
  pair per image, '' on the others).
- ``edits``: the edit log. ``id`` is ``writer << 40 | n``: each process that edits (a *writer*) registers an id of
  its own in ``writers`` and numbers its records 1, 2, 3...; ``op`` ('add', 'delete' or 'labels'), ``pair_id``,
  ``name`` (the label set of a 'labels' record).
- ``writers``: ``writer`` -> ``committed``, the last of its records whose store changes are final. A record is
  written *before* the stores change (an intent) and counts once ``committed`` reaches it, so a process killed in
  between leaves a visible intent that followers settle from the stores' state (``asif.serving.shared_live``).
- ``label_sets``: ``name``, ``templates`` (JSON), ``n`` (classes), ``version``; ``label_rows``: one row per class,
  ``set``, ``version``, ``row``, ``label`` and the class embedding ``vec``. A write adds rows under a new version,
  then points the header at it: readers never see a mix, and two concurrent writes leave one whole set.
- ``trash``: the last deleted pairs (records and both vectors), so that any replica can restore them.
- ``meta``: ``key`` -> JSON ``value`` (the manifest: encoders, k, p, anchor mode).

Every read is Strong. Reads of more rows than one query returns (16,384) go in ranges that cannot overflow
(a writer's records ``n`` to ``n + LOG_PAGE``) or through a query iterator (in id order).

Pair ids come from an ``asif.state.idclock.IdClock``; label sets are read and written by ``MilvusLabelSets``
(``asif.state.milvus_labels``), MilvusMetadata's base class.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asif.state import faults
from asif.state.idclock import IdClock, now_ms
from asif.state.metadata import NewPair, PairRecord
from asif.state.milvus_labels import MilvusLabelSets, quote
from asif.stores.base import StoreError
from asif.stores.milvus_store import CHUNK, STRONG, MilvusIndex, all_ids, create_collection, ids_expr

MAX_VARCHAR = 65_535
WRITER_BITS = 22  # writer ids 1 .. 2**22 - 1; a record's id is writer << N_BITS | n
N_BITS = 40
LOG_PAGE = 8_192  # a writer's records read per query: a range of n this wide cannot overflow a query (16,384)


@dataclass(frozen=True)
class LogRecord:
    """One record of a writer's edit log."""

    writer: int
    n: int
    op: str  # 'add', 'delete' or 'labels'
    pair_id: int
    name: str  # the label set ('labels')


def record_id(writer: int, n: int) -> int:
    return int(writer) << N_BITS | int(n)


PREFIX_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,40}$"  # a Milvus collection name, less the suffixes below
SHARED = ("image", "text", "pairs", "edits", "writers", "label_sets", "label_rows", "trash", "meta")  # of one model


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


class MilvusMetadata(MilvusLabelSets):
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
            else:
                have = {f["name"] for f in self.client.describe_collection(name)["fields"]}
                want = {f for f, _, _ in fields} | {"vec"}
                if have != want:
                    raise StoreError(
                        f"Milvus collection {name!r} has the fields {sorted(have)}, not {sorted(want)}: it was "
                        "written by another version of asif; rebuild the model (asif build --store milvus --force)"
                    )
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
             ("pair_id", DataType.INT64, {}), ("name", DataType.VARCHAR, {"max_length": 128})],
        )  # fmt: skip
        collection("writers", [("writer", DataType.INT64, {"is_primary": True}), ("committed", DataType.INT64, {})])
        collection(
            "label_sets",
            [("name", DataType.VARCHAR, {"is_primary": True, "max_length": 128}),
             ("templates", DataType.VARCHAR, text), ("n", DataType.INT64, {}), ("version", DataType.INT64, {})],
        )  # fmt: skip
        collection(
            "label_rows",
            [("id", DataType.INT64, {"is_primary": True}), ("set", DataType.VARCHAR, {"max_length": 128}),
             ("version", DataType.INT64, {}), ("row", DataType.INT64, {}),
             ("label", DataType.VARCHAR, {"max_length": 4096})],
            vec_dim=self.text_dim,
        )  # fmt: skip
        collection(
            "trash",
            [("id", DataType.INT64, {"is_primary": True}), ("image", DataType.VARCHAR, {"max_length": 1024}),
             ("captions", DataType.VARCHAR, text), ("thumb", DataType.VARCHAR, text),
             ("vectors", DataType.VARCHAR, text), ("image_dim", DataType.INT64, {}), ("at", DataType.INT64, {})],
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
        rows = self._query("meta", f"key == {quote(key)}", ["value"])
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
        rows = self._query("pairs", f"image == {quote(image)} and thumb != ''", ["thumb"], limit=1)
        return base64.b64decode(rows[0]["thumb"]) if rows else None

    def count(self) -> int:
        return int(self._query("pairs", "", ["count(*)"])[0]["count(*)"])

    def ids(self) -> list[int]:
        return all_ids(self.client, self._name("pairs"))

    def page(self, after: int = -1, limit: int = 100) -> list[PairRecord]:
        """The first ``limit`` pairs with ids above ``after``, in id order (a query iterator reads in id order; a
        plain query with a limit returns an arbitrary subset of the matches)."""
        it = self.client.query_iterator(
            self._name("pairs"),
            batch_size=max(1, int(limit)),
            filter=f"id > {int(after)}",
            output_fields=["id", "image", "captions"],
            consistency_level=STRONG,
        )
        try:
            rows = it.next()
        finally:
            it.close()
        recs = [PairRecord(int(r["id"]), r["image"], json.loads(r["captions"])) for r in rows]
        return sorted(recs, key=lambda r: r.id)[: int(limit)]

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

    def log_add(self, pairs: Sequence[NewPair], ids: Sequence[int] | None = None) -> list[int]:
        """Record the pairs (rows with thumbnails) under ``ids`` (assigned here when None); returns the ids."""
        ids = list(ids) if ids is not None else self.clock.take(len(pairs))
        self.insert_pairs((pid, p.image, p.captions, p.thumbnail) for pid, p in zip(ids, pairs, strict=True))
        return ids

    # -- the edit log: one sequence per writer ------------------------------------------------------------------
    def register_writer(self) -> int:
        """A writer id of this process's own (drawn at random, checked unused), with nothing committed."""
        for _ in range(16):
            writer = 1 + secrets.randbelow((1 << WRITER_BITS) - 1)
            if not self._query("writers", f"writer == {writer}", ["writer"]):
                self.client.insert(self._name("writers"), [{"writer": writer, "committed": 0, "vec": [0.0, 0.0]}])
                return writer
        raise StoreError("no unused writer id found in 16 draws")  # pragma: no cover - 4 million ids

    def writers(self) -> dict[int, int]:
        """Every writer and the last record it committed."""
        rows = self._query("writers", "writer > 0", ["writer", "committed"], limit=16_384)
        return {int(r["writer"]): int(r["committed"]) for r in rows}

    def log_intents(self, writer: int, first: int, op: str, pair_ids: Sequence[int], name: str = "") -> int:
        """Write records ``first, first + 1...`` of ``writer`` (before the stores change); returns the last n."""
        rows = [
            {"id": record_id(writer, first + j), "op": op, "pair_id": int(p), "name": name[:128], "vec": [0.0, 0.0]}
            for j, p in enumerate(pair_ids)
        ]
        for start in range(0, len(rows), CHUNK):
            faults.hit("milvus.log_intents")
            self.client.insert(self._name("edits"), rows[start : start + CHUNK])
        return first + len(rows) - 1

    def commit(self, writer: int, n: int) -> None:
        """``writer``'s records up to ``n`` are final: followers apply them."""
        faults.hit("milvus.commit")
        self.client.upsert(self._name("writers"), [{"writer": int(writer), "committed": int(n), "vec": [0.0, 0.0]}])

    def records(self, writer: int, after: int, upto: int) -> list[LogRecord]:
        """``writer``'s records with ``after < n <= upto``, in order (read LOG_PAGE at a time: none is missed)."""
        out: list[LogRecord] = []
        for lo in range(int(after), int(upto), LOG_PAGE):
            hi = min(int(upto), lo + LOG_PAGE)
            rows = self._query(
                "edits",
                f"id > {record_id(writer, lo)} and id <= {record_id(writer, hi)}",
                ["id", "op", "pair_id", "name"],
                limit=LOG_PAGE,
            )
            out.extend(
                LogRecord(writer, int(r["id"]) & ((1 << N_BITS) - 1), r["op"], int(r["pair_id"]), r["name"])
                for r in rows
            )
        return sorted(out, key=lambda r: r.n)

    def last_seq(self) -> int:
        """A version of the shared state: the records committed, over every writer (grows with every edit)."""
        return sum(self.writers().values())

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
            others = self._query("pairs", f"image == {quote(row['image'])}", fields, limit=len(going) + 1)
            heir = next((r for r in others if int(r["id"]) not in going), None)
            if heir is not None and not heir["thumb"]:
                self.client.upsert(self._name("pairs"), [{**heir, "thumb": row["thumb"], "vec": [0.0, 0.0]}])

    def revert_add(self, ids: Sequence[int]) -> None:
        """An add whose store write failed: its pair rows go (no edit was recorded for it)."""
        self.log_delete(ids)

    def compact_log(self, upto_seq: int) -> None:
        """Records stay: replicas follow them (they are a few bytes each)."""

    # -- deleted pairs kept for restoring, by any replica -------------------------------------------------------
    def trash(self, kept: dict[int, NewPair], keep: int) -> None:
        """Keep these deleted pairs (records and vectors); the oldest beyond the last ``keep`` go."""
        rows = []
        for pid, p in kept.items():
            img = np.asarray(p.image_vec, dtype=np.float32)
            vectors = np.concatenate([img, np.asarray(p.text_vec, dtype=np.float32)]).tobytes()
            rows.append(
                {
                    "id": int(pid),
                    "image": p.image[:1024],
                    "captions": json.dumps(list(p.captions), ensure_ascii=False),
                    "thumb": base64.b64encode(p.thumbnail).decode() if p.thumbnail else "",
                    "vectors": base64.b64encode(vectors).decode(),
                    "image_dim": len(img),
                    "at": now_ms(),
                    "vec": [0.0, 0.0],
                }
            )
        for start in range(0, len(rows), CHUNK):
            self.client.upsert(self._name("trash"), rows[start : start + CHUNK])
        held = sorted((int(r["at"]), int(r["id"])) for r in self._query("trash", "id >= 0", ["id", "at"], 16_384))
        old = [pid for _, pid in held[: max(0, len(held) - int(keep))]]
        for start in range(0, len(old), CHUNK):
            self.client.delete(self._name("trash"), ids=old[start : start + CHUNK])

    def trashed(self, ids: Sequence[int]) -> dict[int, NewPair]:
        """The kept deleted pairs among ``ids``."""
        out = {}
        fields = ["id", "image", "captions", "thumb", "vectors", "image_dim"]
        for start in range(0, len(ids), CHUNK):
            for r in self._query("trash", ids_expr("id", ids[start : start + CHUNK]), fields):
                vec = np.frombuffer(base64.b64decode(r["vectors"]), dtype=np.float32)
                d = int(r["image_dim"])
                thumb = base64.b64decode(r["thumb"]) if r["thumb"] else None
                out[int(r["id"])] = NewPair(
                    r["image"], json.loads(r["captions"]), thumb, vec[:d].copy(), vec[d:].copy()
                )
        return out

    def untrash(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), CHUNK):
            self.client.delete(self._name("trash"), ids=ids[start : start + CHUNK])
