"""The embeddings `imgsim index --engine ray` makes, as a dataset of Parquet shards between its
two steps: written whole (a shard on disk is never partial), read back by the next run to leave
out what is done, and loaded into the collection a chunk of rows at a time.

A shard holds rows of (relative path, label, sha256, embedding) and records the fingerprint of
the model that made it; shards of another model are removed. Once every shard is loaded the
dataset is marked COMPLETE, and the next run starts a new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from index.gallery import GalleryIndex
from index.store import NewItem
from models.data import label_of_parts

log = logging.getLogger(__name__)

LOAD_ROWS = 2048  # rows added to the collection per transaction
COMPLETE = "_COMPLETE"  # marks a dataset whose every shard is in the collection
FINGERPRINT_KEY = b"imgsim_fingerprint"  # Parquet metadata: the model that made a shard


def dataset_folder(out_dir: Path) -> Path:
    """Where the Parquet shards of an index folder are written: beside it."""
    return out_dir.with_name(f".{out_dir.name}.embeddings")


def finished_shards(dataset: Path, fingerprint: str) -> set[str]:
    """The relative paths in this dataset's whole shards of this model. A complete dataset
    (loaded by an earlier run), shards of another model and partial writes are removed."""
    import pyarrow.parquet as pq

    if (dataset / COMPLETE).exists():
        shutil.rmtree(dataset)
    dataset.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for path in sorted(dataset.iterdir()):
        if path.suffix != ".parquet":
            path.unlink()  # a shard whose write was cut short
            continue
        metadata = pq.read_schema(path).metadata or {}
        if metadata.get(FINGERPRINT_KEY) != fingerprint.encode():
            log.info("removing %s: embedded by another model", path.name)
            path.unlink()
            continue
        done.update(pq.read_table(path, columns=["path"]).column("path").to_pylist())
    return done


def write_shard(
    dataset: Path, parts: list[dict[str, np.ndarray]], split: bool, fingerprint: str
) -> None:
    """Rows as one Parquet file, written under a temporary name and renamed when whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.concatenate([p["embedding"] for p in parts]).astype(np.float32)
    dim = embeddings.shape[1]
    paths = np.concatenate([p["path"] for p in parts]).tolist()
    labels = [label_of_parts(PurePosixPath(path).parts, split) for path in paths]
    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels, pa.string()),
            "sha256": pa.array(np.concatenate([p["sha256"] for p in parts]).tolist(), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), dim),
        }
    ).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    name = f"shard-{uuid.uuid4().hex[:12]}.parquet"
    pq.write_table(table, dataset / f"{name}.partial")
    os.replace(dataset / f"{name}.partial", dataset / name)


def load_shards(
    dataset: Path,
    stored_path: Callable[[str], str],
    gallery: GalleryIndex,
    stored: dict[str, str | None],
) -> int:
    """Add the shards' rows not yet in the collection, LOAD_ROWS at a time; returns how many.
    A row is left out when its path is in the collection, or its content is there under a
    path that no shard of this run holds (an image indexed before, as `imgsim index` skips)."""
    shards = sorted(dataset.glob("*.parquet"))
    ours = {stored_path(p) for p in _shard_paths(shards)}
    elsewhere = {sha for path, sha in stored.items() if path not in ours}
    added = 0
    for chunk in _chunks(shards):
        paths = [stored_path(p) for p in chunk["path"]]
        keep = [
            i
            for i, (path, sha) in enumerate(zip(paths, chunk["sha256"], strict=True))
            if path not in stored and sha not in elsewhere
        ]
        if not keep:
            continue
        items = [NewItem(paths[i], chunk["label"][i], sha256=chunk["sha256"][i]) for i in keep]
        gallery.add(chunk["embedding"][keep], items)
        stored.update((item.path, item.sha256) for item in items)
        added += len(items)
    log.info("added %d images from %d shard(s) in %s", added, len(shards), dataset)
    return added


def _shard_paths(shards: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for shard in shards:
        yield from pq.read_table(shard, columns=["path"]).column("path").to_pylist()


def _chunks(shards: list[Path]) -> Iterator[dict[str, Any]]:
    """The shards' rows, LOAD_ROWS at a time: paths, hashes and an (N, D) float32 matrix."""
    import pyarrow.parquet as pq

    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=LOAD_ROWS):
            column = batch.column("embedding")
            dim = column.type.list_size
            yield {
                "path": batch.column("path").to_pylist(),
                "label": batch.column("label").to_pylist(),
                "sha256": batch.column("sha256").to_pylist(),
                "embedding": column.flatten().to_numpy().reshape(-1, dim),
            }
