"""Fine-tuning (LP-FT): fit the head on frozen features, then tune the whole network gently.

One process, or several under `torchrun` (DistributedDataParallel: NCCL on GPUs, gloo on CPU).
Each epoch is checkpointed atomically to OUT/checkpoint.pt so that `resume=True` continues an
interrupted run; the checkpoint is removed once the bundle is saved.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from models.backbones import Preprocessing, preprocessing_for
from models.bundle import Bundle, BundleConfig
from models.cluster import Cluster, seed_everything, start_cluster
from models.config import TrainConfig
from models.data import ImageDataset, Sample, load_splits
from models.layout import BundleLayout
from models.network import EmbeddingNet, build_net
from models.trainer import Loaders, Trainer
from models.transforms import eval_transform, train_transform
from models.workers import loader

log = logging.getLogger(__name__)
Hook = Callable[[int], None] | None  # called with the epoch number after its checkpoint


def train(
    data: Path, out_dir: Path, config: TrainConfig, resume: bool = False, on_epoch_end: Hook = None
) -> Bundle:
    """Fine-tune on the class folders of `data` and save the best epoch's bundle to out_dir.

    resume=True continues from out_dir's checkpoint if there is one. on_epoch_end(epoch) is
    called after each epoch's checkpoint is written.
    """
    cluster = start_cluster(config.device)
    try:
        return _train(data, out_dir, config, cluster, resume, on_epoch_end)
    finally:
        if cluster.world > 1:
            dist.destroy_process_group()


def _train(
    data_dir: Path, out_dir: Path, config: TrainConfig, cluster: Cluster, resume: bool, hook: Hook
) -> Bundle:
    seed_everything(config.seed)
    classes, train_set, val_set = load_splits(data_dir, config.val_fraction, config.seed)
    log.info("%d classes, %d train / %d val images", len(classes), len(train_set), len(val_set))
    source = Bundle.load(Path(config.init_from), "cpu") if config.init_from else None
    if source is not None and source.config.backbone != config.backbone:
        log.warning("--init-from: using the bundle's backbone %s", source.config.backbone)
        config = replace(config, backbone=source.config.backbone)
    pre = _preprocessing(config, source)
    net = _initial_net(config, len(classes), source).to(cluster.device)
    if cluster.device.startswith("cuda"):
        net = net.to(memory_format=torch.channels_last)
    layout = BundleLayout(out_dir)
    cache = layout.decoded(cluster.rank) if config.cache_decoded else None
    try:
        run = Trainer(
            net, config, cluster, _loaders(train_set, val_set, config, pre, cluster, cache)
        )
        if resume:
            run.restore(layout.checkpoint)
        history = run.fit(out_dir, hook)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    calibration = run.calibrated_threshold()
    bundle_config = BundleConfig(
        backbone=config.backbone,
        classes=classes,
        preprocessing=pre,
        embed_dim=config.embed_dim,
        head=config.head,
        temperature=config.temperature,
        weights=f"bundle {source.fingerprint}" if source is not None else str(config.weights),
        threshold=calibration.threshold,
        extra={
            "training": asdict(config),
            "data_dir": str(data_dir.resolve()),  # int8 calibration reads its training split
            "best_epoch": run.best_epoch,
            "val_top1": run.best_key[0] if run.best_val is not None else None,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "world_size": cluster.world,
            "threshold_target_precision": config.target_precision,
            "unknown_threshold": calibration.to_dict(),
        },
    )
    bundle = Bundle(bundle_config, run.net, cluster.device)
    if cluster.main:
        run.write_metrics(out_dir)  # with the calibration beside the best epoch
        bundle.save(out_dir)
        layout.checkpoint.unlink(missing_ok=True)
        log.info("saved bundle to %s (best epoch %s of %d)", out_dir, run.best_epoch, len(history))
    if cluster.world > 1:
        dist.barrier()
    return bundle


def _preprocessing(config: TrainConfig, source: Bundle | None) -> Preprocessing:
    """The weights' preprocessing (or the source bundle's) with config.fit, at
    config.image_size if given."""
    pre = source.config.preprocessing if source is not None else preprocessing_for(config.backbone)
    pre = replace(pre, fit=config.fit)
    if config.image_size is None:
        return pre
    resize = round(config.image_size * pre.resize_size / pre.crop_size)
    return replace(pre, crop_size=config.image_size, resize_size=resize)


def _initial_net(config: TrainConfig, num_classes: int, source: Bundle | None) -> EmbeddingNet:
    """A new network; with a source bundle, its trunk (and projection if sizes match) copied."""
    weights = "none" if source is not None else config.weights
    args = (config.backbone, num_classes, weights, config.embed_dim, config.head)
    net = build_net(*args, config.temperature)
    if source is not None:
        copied = init_from(net, source.net)
        log.info("initialised %d tensors from %s", copied, config.init_from)
    return net


def init_from(net: EmbeddingNet, source: EmbeddingNet) -> int:
    """Copy the source's trunk and head tensors whose names and shapes match; returns how many.

    The classifier is never copied: the class set is new. GoogLeNet's auxiliary classifiers'
    last layers have one output per class, so they are left as initialised too.
    """
    copied = 0
    for part in ("trunk", "head"):
        target = getattr(net, part).state_dict()
        fits = {
            name: tensor
            for name, tensor in getattr(source, part).state_dict().items()
            if name in target and target[name].shape == tensor.shape
        }
        getattr(net, part).load_state_dict({**target, **fits})
        copied += len(fits)
    return copied


def _loaders(
    train_set: list[Sample],
    val_set: list[Sample],
    config: TrainConfig,
    pre: Preprocessing,
    cluster: Cluster,
    cache: Path | None,
) -> Loaders:
    """Decoding and augmentation run in `workers` processes; each rank gets its share. With a
    cache folder, each image is decoded once and its resized pixels reused every epoch."""
    common = {
        "batch_size": config.batch_size,
        "pin_memory": cluster.device.startswith("cuda"),
        # Fresh workers each epoch: their seeds then come from the per-epoch seeded generator,
        # so a resumed run augments exactly as an uninterrupted one.
        "persistent_workers": False,
    }
    transform = train_transform(pre) if config.augment else eval_transform(pre)
    train_cache = cache / "train" if cache else None
    train_data = ImageDataset.of_samples(train_set, pre, transform, train_cache)
    sampler = None
    if cluster.world > 1:
        sampler = DistributedSampler(
            train_data, cluster.world, cluster.rank, shuffle=True, seed=config.seed, drop_last=True
        )
    per_rank = len(train_set) // cluster.world
    train_loader = loader(
        train_data,
        config.workers,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=per_rank > config.batch_size,  # no batch of one for BatchNorm
        generator=torch.Generator(),
        **common,
    )
    # The probe sees this rank's share of the training images as served: same cache, no
    # augmentation. Its pass is also the one decode that fills the cache.
    probe_data = copy.copy(train_data)
    probe_data.transform = eval_transform(pre)
    shard = list(range(cluster.rank, len(train_set), cluster.world))
    probe_loader = loader(torch.utils.data.Subset(probe_data, shard), config.workers, **common)
    val_shard = val_set[cluster.rank :: cluster.world]
    val_cache = cache / "val" if cache else None
    val_data = ImageDataset.of_samples(val_shard, pre, eval_transform(pre), val_cache)
    val_loader = loader(val_data, config.workers, **common) if val_set else None
    return Loaders(train_loader, val_loader, probe_loader)
