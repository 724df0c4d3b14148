"""Label sets in a shared (Milvus) model: ``MilvusLabelSets``, the label-set part of
:class:`asif.state.milvus_meta.MilvusMetadata` (its base class), over the ``label_sets`` (headers) and ``label_rows``
(one row per class, with its embedding) collections. A write adds rows under a new version, then points the header
at it: readers never see a mix, and two concurrent writes leave one whole set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from asif.state.metadata import StoredLabelSet
from asif.stores.milvus_store import CHUNK

if TYPE_CHECKING:
    from asif.state.idclock import IdClock

ROWS_PAGE = 8_192  # label rows read per query, by row range
HEAD_READS = 4  # reads of a label set's header before it counts as missing (see MilvusMetadata._head)


def quote(text: str) -> str:
    return json.dumps(text)  # a Milvus string literal: double quotes, backslash escapes


class MilvusLabelSets:
    """Stored label sets: put, read (whole, one version), list, delete."""

    # MilvusMetadata's, which these use.
    client: Any
    clock: IdClock
    text_dim: int

    _name: Callable[[str], str]
    _query: Callable[..., list[dict[str, Any]]]

    def _head(self, name: str) -> dict[str, Any] | None:
        """The set's header row, or None. An upsert is a delete then an insert, and a read between the two finds
        nothing: a set missing is read again a few times before it counts as gone."""
        for attempt in range(HEAD_READS):
            rows = self._query("label_sets", f"name == {quote(name)}", ["name", "templates", "n", "version"])
            if rows:
                return rows[0]
            if attempt + 1 < HEAD_READS:
                time.sleep(0.01 * (attempt + 1))
        return None

    def label_versions(self) -> dict[str, int]:
        """Every stored label set's current version."""
        return {h["name"]: int(h["version"]) for h in self._query("label_sets", "", ["name", "version"], 16_384)}

    def put_label_set(self, stored: StoredLabelSet) -> int:
        """Store a label set under a new version (rows first, then the header); returns the version.

        Two replicas writing one set at once each write their own rows; the header names one of them, and the
        other replica's rows are deleted by that replica once it sees it lost. The version replaced goes too.
        """
        emb = np.ascontiguousarray(stored.embeddings, dtype=np.float32)
        old = self._head(stored.name)
        version = self.clock.take(1)[0]
        rows = [
            {"id": rid, "set": stored.name, "version": version, "row": r, "label": label[:4096], "vec": emb[r].tolist()}
            for r, (rid, label) in enumerate(zip(self.clock.take(len(stored.classes)), stored.classes, strict=True))
        ]
        for start in range(0, len(rows), CHUNK):
            self.client.insert(self._name("label_rows"), rows[start : start + CHUNK])
        header = {"name": stored.name, "templates": json.dumps(stored.templates, ensure_ascii=False),
                  "n": len(stored.classes), "version": version, "vec": [0.0, 0.0]}  # fmt: skip
        self.client.upsert(self._name("label_sets"), [header])
        now = self._head(stored.name)
        if now is None or int(now["version"]) != version:  # another write (or a delete) came after this one
            self._drop_rows(stored.name, version)
        elif old is not None:
            self._drop_rows(stored.name, int(old["version"]))
        return version

    def _drop_rows(self, name: str, version: int) -> None:
        self.client.delete(self._name("label_rows"), filter=f"set == {quote(name)} and version == {int(version)}")

    def label_set(self, name: str) -> StoredLabelSet | None:
        """The label set's current version whole, or None (no such set)."""
        for _ in range(8):  # a write that replaces the version between the header read and the rows: read again
            head = self._head(name)
            if head is None:
                return None
            version, n = int(head["version"]), int(head["n"])
            rows: list[dict[str, Any]] = []
            for lo in range(0, n, ROWS_PAGE):
                rows += self._query(
                    "label_rows",
                    f"set == {quote(name)} and version == {version} and row >= {lo} and row < {lo + ROWS_PAGE}",
                    ["row", "label", "vec"],
                    limit=ROWS_PAGE,
                )
            if len(rows) == n:
                rows.sort(key=lambda r: int(r["row"]))
                emb = np.asarray([r["vec"] for r in rows], dtype=np.float32).reshape(n, self.text_dim)
                labels = [r["label"] for r in rows]
                return StoredLabelSet(name, labels, json.loads(head["templates"]), emb, version)
        return None  # pragma: no cover - rewritten eight times while being read

    def label_sets(self) -> list[StoredLabelSet]:
        found = (self.label_set(name) for name in sorted(self.label_versions()))
        return [s for s in found if s is not None]

    def delete_label_set(self, name: str) -> bool:
        found = self._head(name) is not None
        self.client.delete(self._name("label_sets"), filter=f"name == {quote(name)}")
        self.client.delete(self._name("label_rows"), filter=f"set == {quote(name)}")
        return found
