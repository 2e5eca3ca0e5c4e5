"""Service settings, read once from IMGSIM_* environment variables or given by the caller."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from index.database import Database
from models.backbones import DEFAULT_BACKBONE, check_backbone
from models.devices import DEVICES
from models.images import DEFAULT_MAX_PIXELS
from models.layout import BundleLayout
from models.runtime import RUNTIMES, check_runtime


def available_cpus() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (two cores)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


class Settings(BaseSettings):
    """Where the bundle and index are, and the limits on uploads."""

    model_config = SettingsConfigDict(env_prefix="IMGSIM_", env_ignore_empty=True)

    bundle_dir: Path | None = Field(None, description="trained bundle; None serves ImageNet")
    index_dir: Path | None = Field(None, description="gallery index; default BUNDLE/index")
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://USER:PASSWORD@HOST/DB) that keeps the items "
        "and change log in place of the index folder's items.sqlite; the folder keeps the FAISS "
        "snapshots and uploaded images (pip install 'imgsim[postgres]')",
    )
    uploads_url: str | None = Field(
        None,
        description="where uploaded images are kept, for replicas on machines of their own: an "
        "fsspec URL such as s3://bucket/prefix (pip install 'imgsim[s3]'); default: the index "
        "folder's images/",
    )
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    device: str = "auto"
    runtime: str = Field(
        "auto",
        description=f"one of {', '.join(RUNTIMES)}; auto: OpenVINO fp32 on the CPU",
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="bytes of one image")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="bytes of a whole request body, checked before reading"
    )
    max_files: int = Field(32, gt=0, description="images in one POST /images")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a client may stall while sending a request body"
    )
    body_deadline: float = Field(
        120.0, gt=0, description="seconds a whole request body may take, however it trickles"
    )
    header_timeout: float = Field(
        5.0, gt=0, description="seconds a connection may take to finish a request's headers"
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    duplicate_threshold: float = Field(
        0.97, ge=-1.0, le=1.0, description="POST /images flags a stored image scoring this or more"
    )
    index_factory: str | None = Field(
        None, description="FAISS factory string, e.g. 'HNSW32'; default: chosen by size"
    )
    snapshot_every: int = Field(
        1000, gt=0, description="snapshot the index after this many changes"
    )
    thorough_index_check: bool = Field(
        False, description="at start, SQLite's integrity_check of the index instead of quick_check"
    )
    host: str = Field("127.0.0.1", description="address served on; 'imgsim serve --host' sets it")
    api_key: SecretStr | None = Field(
        None, description="key that POST /images and DELETE /images/{id} need; never logged"
    )
    allow_open_writes: bool = Field(
        False, description="allow writes without a key on a non-loopback address"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed cross-origin, comma-separated"
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    # Serving under load: one inference worker runs one forward at a time with `threads` intra-op
    # threads; the requests' decoding runs beside it, in at most `threads` threads at once.
    # max_batch 4 served more req/s than 1 at 16 clients in every bundle and runtime measured, and
    # waiting for a fuller batch only adds latency, so the worker takes what is queued (wait 0):
    # benchmarks/serve_load.md.
    threads: int = Field(
        default_factory=available_cpus,
        gt=0,
        description="intra-op threads of the model runtime (torch, ONNX Runtime, OpenVINO); "
        "default: the cores this process may use",
    )
    max_batch: int = Field(
        4, gt=0, description="images the inference worker runs in one forward at most"
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        description="how long the worker waits for more images before a forward; 0: it takes "
        "what is queued and starts",
    )
    queue_size: int = Field(
        16, gt=0, description="images waiting for the model at most; beyond it: 503 + Retry-After"
    )

    @field_validator("bundle_dir", "index_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # IMGSIM_BUNDLE_DIR= (set, empty: compose's way to unset it) means none.
        return None if value == "" else value

    @field_validator("bundle_dir")
    @classmethod
    def _bundle_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"bundle folder {value} does not exist")
        return value.resolve() if value is not None else None

    @field_validator("index_dir")
    @classmethod
    def _absolute_index(cls, value: Path | None) -> Path | None:
        # Uploaded images are stored below the index; their paths in answers are absolute.
        return value.resolve() if value is not None else None

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return check_backbone(value)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in DEVICES and not value.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")
        return value

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        return check_runtime(value)

    def torch_threads(self, runtime: str) -> int:
        """torch's intra-op threads beside the named runtime (resolved, not auto): `threads`
        when torch runs the model; else 1, as torch only preprocesses then, and a torch thread
        team spinning after a small op would take a core from the forward (efficientnet_lite0
        under ONNX Runtime, batch-1 encode, 200 interleaved: median 11.7 ms with two torch
        threads, 10.2 ms with one)."""
        return self.threads if runtime == "torch" else 1

    def database(self) -> Database | None:
        """The PostgreSQL database that holds the items, if one is set."""
        return None if self.database_url is None else Database(self.database_url.get_secret_value())

    def resolved_index_dir(self) -> Path | None:
        """The index folder to serve: the one given, else BUNDLE/index when a bundle is given."""
        if self.index_dir is not None:
            return self.index_dir
        return BundleLayout(self.bundle_dir).index if self.bundle_dir is not None else None
