"""Fine-tuning: head-only warm-up, then the whole network with a lower backbone learning rate."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.backbones import DEFAULT_BACKBONE, preprocessing_for
from models.bundle import Bundle, BundleConfig, atomic_write
from models.data import ImageDataset, Sample, eval_transform, load_splits, train_transform
from models.devices import resolve_device
from models.network import DEFAULT_TEMPERATURE, EmbeddingNet, build_net

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    """Every knob of a training run; saved with the bundle."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    epochs: int = 10
    warmup_epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    embed_dim: int | None = None
    head: str = "cosine"
    temperature: float = DEFAULT_TEMPERATURE
    aux_weight: float = 0.3  # GoogLeNet's auxiliary losses, as in the paper
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    amp: bool = True


def train(data_dir: Path, out_dir: Path, config: TrainConfig) -> Bundle:
    """Fine-tune on DATA_DIR's class folders and save the best epoch's bundle to out_dir."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    classes, train_set, val_set = load_splits(data_dir, config.val_fraction, config.seed)
    log.info("%d classes, %d train / %d val images", len(classes), len(train_set), len(val_set))
    net = build_net(
        config.backbone,
        len(classes),
        config.weights,
        config.embed_dim,
        config.head,
        config.temperature,
    ).to(device)
    if device.startswith("cuda"):
        net = net.to(memory_format=torch.channels_last)
    run = _Run(net, config, device, *_loaders(train_set, val_set, config, device))
    history = run.fit(out_dir)
    bundle_config = BundleConfig(
        backbone=config.backbone,
        classes=classes,
        preprocessing=preprocessing_for(config.backbone),
        embed_dim=config.embed_dim,
        head=config.head,
        temperature=config.temperature,
        weights=str(config.weights),
        extra={
            "training": asdict(config),
            "best_epoch": run.best_epoch,
            "train_images": len(train_set),
            "val_images": len(val_set),
        },
    )
    bundle = Bundle(bundle_config, run.net, device)
    bundle.save(out_dir)
    log.info("saved bundle to %s (best epoch %s of %d)", out_dir, run.best_epoch, len(history))
    return bundle


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loaders(
    train_set: list[Sample], val_set: list[Sample], config: TrainConfig, device: str
) -> tuple[DataLoader, DataLoader | None]:
    pre = preprocessing_for(config.backbone)
    draft = pre.resize_size * 2
    common = {
        "batch_size": config.batch_size,
        "num_workers": config.workers,
        "pin_memory": device.startswith("cuda"),
        "persistent_workers": config.workers > 0,
    }
    train_loader = DataLoader(
        ImageDataset(train_set, train_transform(pre), draft),
        shuffle=True,
        drop_last=len(train_set) > config.batch_size,  # no batch of one for BatchNorm
        generator=torch.Generator().manual_seed(config.seed),
        **common,
    )
    val_loader = (
        DataLoader(ImageDataset(val_set, eval_transform(pre), draft), **common) if val_set else None
    )
    return train_loader, val_loader


class _Run:
    """One training run's state: optimiser, schedule, scaler and the best weights so far."""

    def __init__(
        self,
        net: EmbeddingNet,
        config: TrainConfig,
        device: str,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
    ):
        self.net, self.config, self.device = net, config, device
        self.train_loader, self.val_loader = train_loader, val_loader
        head_params = [*net.head.parameters(), *net.classifier.parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": list(net.trunk.parameters()),
                    "lr": config.lr * config.backbone_lr_factor,
                },
                {"params": head_params, "lr": config.lr},
            ],
            weight_decay=config.weight_decay,
        )
        steps = len(train_loader)
        warm_steps = config.warmup_epochs * steps
        total_finetune = max(1, (config.epochs - config.warmup_epochs) * steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: (
                1.0
                if step < warm_steps
                else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm_steps) / total_finetune)))
            ),
        )
        self.amp = config.amp and device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.best_state: dict | None = None
        self.best_key: tuple[float, float] | None = None
        self.best_epoch: int | None = None

    def fit(self, out_dir: Path) -> list[dict]:
        """Train every epoch, validate, record metrics and keep the best weights."""
        out_dir.mkdir(parents=True, exist_ok=True)
        history: list[dict] = []
        for epoch in range(1, self.config.epochs + 1):
            phase = "warmup" if epoch <= self.config.warmup_epochs else "finetune"
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch, phase)
            val_loss, val_top1 = self.validate()
            record = {
                "epoch": epoch,
                "phase": phase,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_top1": val_top1,
                "lr": self.optimizer.param_groups[1]["lr"],
                "seconds": round(time.perf_counter() - started, 2),
            }
            history.append(record)
            log.info("epoch %d/%d %s", epoch, self.config.epochs, _describe(record))
            self.keep_if_best(epoch, val_loss, val_top1)
            text = json.dumps(history, indent=2)
            atomic_write(out_dir / METRICS_FILE, lambda path, text=text: path.write_text(text))
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
        return history

    def train_epoch(self, epoch: int, phase: str) -> float:
        """One pass over the training set; the trunk is frozen (and in eval mode) in warm-up."""
        frozen = phase == "warmup"
        self.net.train()
        for param in self.net.trunk.parameters():
            param.requires_grad_(not frozen)
        if frozen:
            self.net.trunk.eval()
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch} ({phase})", unit="batch", leave=False)
        for x, y in bar:
            x, y = self._to_device(x, y)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                out = self.net(x)
                loss = F.cross_entropy(out.logits, y)
                for aux in out.aux_logits:
                    loss = loss + self.config.aux_weight * F.cross_entropy(aux, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        return round(total / max(count, 1), 4)

    @torch.inference_mode()
    def validate(self) -> tuple[float | None, float | None]:
        """Mean cross-entropy and top-1 accuracy on the validation set."""
        if self.val_loader is None:
            return None, None
        self.net.eval()
        loss, correct, count = 0.0, 0, 0
        for x, y in self.val_loader:
            x, y = self._to_device(x, y)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                logits = self.net(x).logits.float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
        return round(loss / count, 4), round(correct / count, 4)

    def keep_if_best(self, epoch: int, val_loss: float | None, val_top1: float | None) -> None:
        """Best = highest val top-1, then lowest val loss; without validation, the last epoch."""
        key = (val_top1 or 0.0, -(val_loss or 0.0))
        if self.best_key is None or key >= self.best_key or val_top1 is None:
            self.best_key, self.best_epoch = key, epoch
            self.best_state = copy.deepcopy({k: v.cpu() for k, v in self.net.state_dict().items()})

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.startswith("cuda")
        x = x.to(self.device, non_blocking=non_blocking)
        if non_blocking:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=non_blocking)


def _describe(record: dict) -> str:
    parts = [f"train_loss={record['train_loss']:.4f}"]
    if record["val_loss"] is not None:
        parts.append(f"val_loss={record['val_loss']:.4f} val_top1={record['val_top1']:.3f}")
    parts.append(f"({record['seconds']:.1f}s)")
    return " ".join(parts)
