"""FAISS snapshots: the index serialised to a file named by the last change it contains.

snapshot.json is the commit point: it names the snapshot file, the seq of the last change in it,
the model fingerprint, dim, factory, search params and the file's sha256. Both are written to a
temporary name, fsynced and renamed into place, the file before the json, so a crash leaves the
previous snapshot or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.files import atomic_write

log = logging.getLogger(__name__)

INFO_FILE = "snapshot.json"
PREFIX = "snapshot-"


class SnapshotUnusable(Exception):
    """The snapshot is missing, corrupt or of another model; the index is rebuilt from SQLite."""


def write_snapshot(directory: Path, data: np.ndarray, info: dict[str, Any]) -> None:
    """Write serialised index bytes and their info atomically, then drop older snapshots."""
    name = f"{PREFIX}{info['last_seq']}-{uuid.uuid4().hex[:8]}.faiss"
    atomic_write(directory / name, lambda path: path.write_bytes(data.tobytes()))
    info = {**info, "file": name, "sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(info, indent=2)
    atomic_write(directory / INFO_FILE, lambda path: path.write_text(text))
    for old in directory.glob(f"{PREFIX}*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_snapshot(directory: Path) -> tuple[faiss.Index, dict[str, Any]]:
    """The saved index and its info; raises SnapshotUnusable saying why it cannot be used."""
    info_path = directory / INFO_FILE
    if not info_path.is_file():
        raise SnapshotUnusable("there is no snapshot")
    try:
        info = json.loads(info_path.read_text())
        data = np.fromfile(directory / info["file"], dtype=np.uint8)
    except (OSError, ValueError, KeyError) as err:
        raise SnapshotUnusable(f"the snapshot cannot be read ({err})") from err
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise SnapshotUnusable(f"{info['file']} does not match its checksum")
    try:
        index = faiss.deserialize_index(data)
    except RuntimeError as err:
        raise SnapshotUnusable(f"FAISS cannot read {info['file']} ({err})") from err
    return index, info
