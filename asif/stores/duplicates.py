"""Bitwise-identical rows: with one anchor per caption, every image is repeated once per caption."""

from __future__ import annotations

import numpy as np

from asif.math.rowhash import row_hashes


def rows_by_hash(x: np.ndarray) -> dict[int, list[int]]:
    """Row numbers of x bucketed by a hash of the row's bytes (equal rows share a bucket; :func:`row_hashes`)."""
    buckets: dict[int, list[int]] = {}
    for row, key in enumerate(row_hashes(x).tolist()):
        buckets.setdefault(key, []).append(row)
    return buckets


def count_distinct_rows(x: np.ndarray) -> int:
    """Distinct rows of x (a hash collision undercounts by one: harmless for sizing an index)."""
    return len(rows_by_hash(x))


class DuplicateGroups:
    """Bookkeeping of groups of bitwise-identical vectors indexed once (see ``asif.stores.faiss_store``).

    The indexed key of a group is its smallest pair id; ``members(key)`` lists all its pair ids and ``key_of``
    maps every other member to it. The store holds one vector per key; this class only says which.
    """

    def __init__(self, members: np.ndarray | None = None, keys: np.ndarray | None = None) -> None:
        self._members: dict[int, list[int]] = {}
        self._key_of: dict[int, int] = {}
        if members is not None and keys is not None:
            for member, key in zip(members.tolist(), keys.tolist(), strict=True):
                self._key_of[member] = key
                self._members.setdefault(key, [key]).append(member)

    def __bool__(self) -> bool:
        return bool(self._members)

    def non_keys(self) -> list[int]:
        """Pair ids held through a group's key (not indexed themselves)."""
        return list(self._key_of)

    def key_of(self, pair_id: int) -> int:
        return self._key_of.get(pair_id, pair_id)

    def members(self, key: int) -> list[int] | tuple[int]:
        return self._members.get(key, (key,))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(member ids, their group keys) for every pair that is not its group's key."""
        members = np.fromiter(self._key_of.keys(), dtype=np.int64, count=len(self._key_of))
        keys = np.fromiter(self._key_of.values(), dtype=np.int64, count=len(self._key_of))
        return members, keys

    def group(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Group the bitwise-identical rows of one add; records the groups, returns the rows to index (sorted)."""
        groups: list[list[int]] = []
        for rows in rows_by_hash(x).values():
            while rows:  # split a bucket by exact equality (hash collisions stay apart)
                same = [r for r in rows if np.array_equal(x[r], x[rows[0]])]
                groups.append(same)
                rows = [r for r in rows if r not in same] if len(same) < len(rows) else []
        keep = []
        for rows in groups:
            if len(rows) == 1:
                keep.append(rows[0])
                continue
            group = sorted(int(ids[r]) for r in rows)
            key = group[0]
            keep.append(next(r for r in rows if ids[r] == key))
            self._members[key] = group
            for member in group[1:]:
                self._key_of[member] = key
        return np.sort(np.asarray(keep, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> tuple[list[int], list[tuple[int, int]]]:
        """Forget these held pair ids; returns (indexed keys whose vector goes, (old key, new key) moves).

        Descending: a group's other members go before its key (the smallest id), so a group deleted whole is
        one dropped key instead of a chain of moves.
        """
        drop: list[int] = []
        moves: list[tuple[int, int]] = []
        for pid in np.sort(np.asarray(ids, dtype=np.int64))[::-1].tolist():
            key = self._key_of.pop(pid, None)
            if key is not None:  # a non-key member: only the group shrinks
                group = self._members[key]
                group.remove(pid)
                if len(group) == 1:
                    del self._members[key]
                continue
            group = self._members.pop(pid, None)
            if group is None:
                drop.append(pid)
                continue
            rest = [m for m in group if m != pid]  # the key went: the smallest remaining member takes over
            new = min(rest)
            del self._key_of[new]
            if len(rest) > 1:
                self._members[new] = sorted(rest)
                for member in rest:
                    if member != new:
                        self._key_of[member] = new
            moves.append((pid, new))
        return drop, moves
