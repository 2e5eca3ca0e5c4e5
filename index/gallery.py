"""A gallery: a FAISS inner-product index of normalised embeddings with SQLite metadata."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index.errors import EmptyIndex, IndexMissing, ModelMismatch

log = logging.getLogger(__name__)

CURRENT = "CURRENT"  # names the version folder in use; replaced atomically
FAISS_FILE = "faiss.index"
META_FILE = "meta.sqlite"
INFO_FILE = "index.json"


@dataclass(frozen=True)
class Neighbour:
    """One search result."""

    id: int
    path: str
    label: str | None
    score: float


class GalleryIndex:
    """Embeddings searched by inner product; ids map to SQLite rows (id, path, label)."""

    def __init__(self, index: faiss.Index, meta: sqlite3.Connection, fingerprint: str):
        self.index = index
        self.meta = meta
        self.fingerprint = fingerprint
        self._lock = threading.Lock()  # guards the SQLite connection shared by request threads

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def create(cls, dim: int, fingerprint: str) -> GalleryIndex:
        """An empty exact (flat) index for embeddings of size dim from the given model."""
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        meta = sqlite3.connect(":memory:", check_same_thread=False)
        _create_schema(meta)
        return cls(index, meta, fingerprint)

    def add(
        self, embeddings: np.ndarray, paths: Sequence[str], labels: Sequence[str | None]
    ) -> list[int]:
        """Add normalised embeddings with their metadata; returns their new ids."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"expected embeddings of shape (n, {self.dim}), got {embeddings.shape}"
            )
        if not len(embeddings) == len(paths) == len(labels):
            raise ValueError("embeddings, paths and labels must have the same length")
        with self._lock:
            start = self.meta.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM items").fetchone()[0]
            ids = list(range(start, start + len(paths)))
            self.meta.executemany(
                "INSERT INTO items (id, path, label) VALUES (?, ?, ?)",
                zip(ids, paths, labels, strict=True),
            )
            self.meta.commit()
            self.index.add_with_ids(embeddings, np.asarray(ids, dtype=np.int64))
        return ids

    def search(self, queries: np.ndarray, k: int) -> list[list[Neighbour]]:
        """The k nearest items of each query, best first."""
        if len(self) == 0:
            raise EmptyIndex("the index is empty: add images with 'imgsim index GALLERY_DIR'")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        scores, ids = self.index.search(queries, min(k, len(self)))
        rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        return [
            [
                Neighbour(int(i), *rows[int(i)], float(s))
                for i, s in zip(id_row, score_row, strict=True)
                if i >= 0
            ]
            for id_row, score_row in zip(ids, scores, strict=True)
        ]

    def _rows(self, ids: set[int]) -> dict[int, tuple[str, str | None]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            found = self.meta.execute(
                f"SELECT id, path, label FROM items WHERE id IN ({marks})", tuple(ids)
            ).fetchall()
        return {row[0]: (row[1], row[2]) for row in found}

    def labels(self) -> dict[str | None, int]:
        """How many items carry each label."""
        with self._lock:
            rows = self.meta.execute("SELECT label, COUNT(*) FROM items GROUP BY label").fetchall()
        return dict(rows)

    def check_model(self, fingerprint: str) -> None:
        """Raise ModelMismatch unless the index was built with the model of this fingerprint."""
        if fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"the index was built with model {self.fingerprint}, not with the model being "
                f"served ({fingerprint}); rebuild it with 'imgsim index GALLERY_DIR --model BUNDLE'"
            )

    def save(self, directory: Path) -> None:
        """Write a new version folder, then switch CURRENT to it; the old one stays until then."""
        directory.mkdir(parents=True, exist_ok=True)
        name = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        staging = directory / f".tmp-{name}"
        staging.mkdir()
        faiss.write_index(self.index, str(staging / FAISS_FILE))
        with self._lock:
            target = sqlite3.connect(staging / META_FILE)
            self.meta.backup(target)
            target.close()
        info = {"fingerprint": self.fingerprint, "dim": self.dim, "count": len(self)}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        for path in staging.iterdir():
            _fsync(path)
        os.rename(staging, directory / name)
        _replace_text(directory / CURRENT, name)
        _remove_other_versions(directory, keep=name)
        log.info("wrote index of %d items to %s", len(self), directory / name)

    @classmethod
    def load(cls, directory: Path, fingerprint: str | None = None) -> GalleryIndex:
        """Open the current version; with a fingerprint, refuse an index of another model."""
        pointer = directory / CURRENT
        if not pointer.is_file():
            raise IndexMissing(
                f"no index at {directory}: build one with 'imgsim index GALLERY_DIR --model BUNDLE'"
            )
        version = directory / pointer.read_text().strip()
        info = json.loads((version / INFO_FILE).read_text())
        index = faiss.read_index(str(version / FAISS_FILE))
        meta = sqlite3.connect(":memory:", check_same_thread=False)
        source = sqlite3.connect(version / META_FILE)
        source.backup(meta)
        source.close()
        gallery = cls(index, meta, info["fingerprint"])
        if fingerprint is not None:
            gallery.check_model(fingerprint)
        return gallery


def _create_schema(meta: sqlite3.Connection) -> None:
    meta.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT)")
    meta.commit()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_other_versions(directory: Path, keep: str) -> None:
    for child in directory.iterdir():
        if child.is_dir() and child.name != keep and child.name.startswith(("v-", ".tmp-v-")):
            shutil.rmtree(child, ignore_errors=True)
