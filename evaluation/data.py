"""Test sets in ImageFolder layout (root/<class>/<image>), class-name mappings, prompt templates."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class TestSet:
    root: Path
    folders: list[str]  # class folder names, sorted
    names: list[str]  # class names used in prompts
    files: list[Path]
    labels: list[int]
    renamed: dict[str, str] = field(default_factory=dict)  # folder -> name, where two folders had one name


def disambiguate(folders: list[str], names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Class names made distinct: a name that several folders share becomes 'name (folder)' for each of them
    (ImageNet-1k has two 'crane' and two 'maillot'). Returns the names and {folder: new name} of those renamed."""
    counts = Counter(names)
    renamed = {f: f"{n} ({f})" for f, n in zip(folders, names, strict=True) if counts[n] > 1}
    return [renamed.get(f, n) for f, n in zip(folders, names, strict=True)], renamed


def read_class_map(path: Path) -> dict[str, str]:
    """TSV or CSV lines 'folder<TAB or ,>name' (a header line is allowed if it does not match a folder)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        sep = "\t" if "\t" in line else ","
        folder, _, name = line.partition(sep)
        out[folder.strip()] = name.strip()
    return out


def read_templates(path: Path) -> list[str]:
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


def load_test_set(root: Path, class_map: Path | None = None) -> TestSet:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"test set folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image>)")
    mapping = read_class_map(class_map) if class_map else {}
    names, renamed = disambiguate(folders, [mapping.get(f, f.replace("_", " ")) for f in folders])
    files: list[Path] = []
    labels: list[int] = []
    for c, folder in enumerate(folders):
        for f in sorted((root / folder).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(c)
    return TestSet(root, folders, names, files, labels, renamed)


def content_hashes(paths: list[Path]) -> set[str]:
    return {hashlib.sha1(p.read_bytes()).hexdigest() for p in paths if p.is_file()}
