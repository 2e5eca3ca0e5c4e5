"""One training run's loop: the probe of LP-FT, epochs, validation, the best weights, the
"unknown" threshold, and checkpoints to resume from."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.cluster import Cluster, seed_everything
from models.config import TrainConfig
from models.files import atomic_write
from models.layout import BundleLayout
from models.losses import metric_loss
from models.metrics import Calibration, choose_threshold
from models.network import EmbeddingNet

log = logging.getLogger(__name__)

# Changing these between an interrupted run and its resumption does not change the result.
_RESUME_MAY_DIFFER = ("workers", "device")


@dataclass
class Loaders:
    """The DataLoaders of a run."""

    train: DataLoader
    val: DataLoader | None
    probe: DataLoader


class Trainer:
    """One training run's state: optimiser, schedule, scaler and the best weights so far."""

    def __init__(self, net: EmbeddingNet, config: TrainConfig, cluster: Cluster, loaders: Loaders):
        self.net, self.config, self.cluster = net, config, cluster
        self.device = cluster.device
        self.train_loader, self.val_loader = loaders.train, loaders.val
        self.probe_loader = loaders.probe
        trunk_lr = config.lr * config.backbone_lr_factor
        head_params = [*net.head.parameters(), *net.classifier.parameters()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(net.trunk.parameters()), "lr": trunk_lr},
                {"params": head_params, "lr": config.lr},
            ],
            weight_decay=config.weight_decay,
        )
        steps = len(self.train_loader)
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
        self.metric_loss = metric_loss(config.metric_loss, net.classifier.weight)
        self.amp = config.amp and self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self.best_key: tuple[float, float] | None = None
        self.best_epoch: int | None = None
        self.best_val: dict[str, torch.Tensor] | None = None  # val confidences of the best epoch
        self._ddp: tuple[bool, DistributedDataParallel] | None = None

    def fit(self, out_dir: Path, on_epoch_end: Callable[[int], None] | None = None) -> list[dict]:
        """Train every epoch, validate, record metrics, checkpoint and keep the best weights."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.config.probe and not self.history:
            self._end_epoch(out_dir, 0, "probe", time.perf_counter(), self.probe(), on_epoch_end)
        done = self.history[-1]["epoch"] if self.history else 0
        for epoch in range(done + 1, self.config.epochs + 1):
            phase = "warmup" if epoch <= self.config.warmup_epochs else "finetune"
            started = time.perf_counter()
            self._seed_epoch(epoch)
            train_loss = self.train_epoch(epoch, phase)
            self._end_epoch(out_dir, epoch, phase, started, train_loss, on_epoch_end)
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
        return self.history

    def _end_epoch(
        self,
        out_dir: Path,
        epoch: int,
        phase: str,
        started: float,
        train_loss: float,
        on_epoch_end: Callable[[int], None] | None,
    ) -> None:
        """Validate, record, keep the best weights, write metrics and the checkpoint."""
        val_loss, val_top1, val_predictions = self.validate()
        record = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": self.optimizer.param_groups[1]["lr"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        self.history.append(record)
        self.keep_if_best(epoch, val_loss, val_top1, val_predictions)
        if self.cluster.main:
            log.info("epoch %d/%d %s", epoch, self.config.epochs, _describe(record))
            self.write_metrics(out_dir)
            self.save_checkpoint(BundleLayout(out_dir).checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    def _seed_epoch(self, epoch: int) -> None:
        """Every random draw of an epoch follows from (seed, rank, epoch): resuming needs no
        saved random state, and ranks augment differently."""
        seed = self.config.seed + 1_000_003 * epoch + 7919 * self.cluster.rank
        seed_everything(seed)
        self.train_loader.generator.manual_seed(seed)
        if isinstance(self.train_loader.sampler, DistributedSampler):
            self.train_loader.sampler.set_epoch(epoch)

    def train_epoch(self, epoch: int, phase: str) -> float:
        """One pass over the training set; the trunk is frozen (and in eval mode) in warm-up."""
        frozen = phase == "warmup"
        self.net.train()
        trunk = list(self.net.trunk.parameters())  # in order from the input
        kept = len(trunk) - round(self.config.trunk_share * len(trunk))
        for i, param in enumerate(trunk):
            param.requires_grad_(not frozen and i >= kept)
        if frozen:
            self.net.trunk.eval()
        elif self.config.freeze_bn:
            for module in self.net.trunk.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()  # running statistics stay; the affine parameters still train
        model = self._trainable(frozen)
        total, count = 0.0, 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch} ({phase})",
            unit="batch",
            leave=False,
            disable=not self.cluster.main,
        )
        for x, y in bar:
            x, y = self._to_device(x, y)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                out = model(x)
                loss = F.cross_entropy(self._with_margin(out.logits, y), y)
                for aux in out.aux_logits:
                    loss = loss + self.config.aux_weight * F.cross_entropy(aux, y)
                if self.metric_loss is not None:
                    loss = loss + self.config.metric_weight * self.metric_loss(out.embedding, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        total, count = self.cluster.sum(total, count)
        return round(total / max(count, 1), 4)

    def _with_margin(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cosine head's logits with --margin taken off each true class's cosine (CosFace);
        as they are for a linear head or no margin."""
        temperature = getattr(self.net.classifier, "temperature", None)
        if not self.config.margin or temperature is None:
            return logits
        return logits - F.one_hot(labels, logits.shape[1]) * (self.config.margin / temperature)

    def probe(self) -> float:
        """The LP of LP-FT: fit the head and classifier on the frozen trunk's pooled features of
        the training images (full batch, AdamW); returns the final training loss."""
        features, labels = self._frozen_features()
        parts = [self.net.head.projection, self.net.classifier]
        params = [p for part in parts for p in part.parameters()]
        optimizer = torch.optim.AdamW(
            params, lr=self.config.probe_lr, weight_decay=self.config.weight_decay
        )
        for part in parts:
            part.train()
        for _ in range(self.config.probe_steps):
            logits = self.net.classifier(self.net.head.projection(features))
            loss = F.cross_entropy(self._with_margin(logits, labels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return round(loss.item(), 4)

    @torch.no_grad()
    def _frozen_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled trunk features (N, F) and labels of every rank's training images."""
        self.net.eval()
        chunks, labels = [], []
        for x, y in tqdm(self.probe_loader, desc="probe features", unit="batch",
                         disable=not self.cluster.main):  # fmt: skip
            x, y = self._to_device(x, y)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                feature_map, _ = self.net.trunk(x)
            chunks.append(torch.flatten(self.net.head.pool(feature_map.float()), 1))
            labels.append(y)
        shares = self.cluster.gather((torch.cat(chunks).cpu(), torch.cat(labels).cpu()))
        features = torch.cat([f for f, _ in shares]).to(self.device)
        return features, torch.cat([t for _, t in shares]).to(self.device)

    def _trainable(self, frozen: bool) -> torch.nn.Module:
        """The network, wrapped in DDP under torchrun; rewrapped when the trainable set changes
        (DDP fixes at construction which parameters it all-reduces)."""
        if self.cluster.world == 1:
            return self.net
        if self._ddp is None or self._ddp[0] != frozen:
            ids = [self.device] if self.device.startswith("cuda") else None
            self._ddp = (frozen, DistributedDataParallel(self.net, device_ids=ids))
        return self._ddp[1]

    @torch.inference_mode()
    def validate(self) -> tuple[float | None, float | None, dict[str, torch.Tensor] | None]:
        """Mean cross-entropy, top-1 accuracy, and each val image's confidence and correctness,
        over every rank's share."""
        if self.val_loader is None:
            return None, None, None
        self.net.eval()
        loss, confidences, correct = 0.0, [], []
        for x, y in self.val_loader:
            x, y = self._to_device(x, y)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                logits = self.net(x).logits.float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            probabilities = logits.softmax(dim=1)
            confidences.append(probabilities.max(dim=1).values.cpu())
            correct.append((probabilities.argmax(1) == y).cpu())
        predictions = {  # a rank's share may be empty when there are fewer val images than ranks
            "confidences": torch.cat([torch.zeros(0), *confidences]),
            "correct": torch.cat([torch.zeros(0, dtype=torch.bool), *correct]),
        }
        shares = self.cluster.gather(predictions)
        predictions = {key: torch.cat([share[key] for share in shares]) for key in predictions}
        count = len(predictions["correct"])
        loss, _ = self.cluster.sum(loss, 0)
        top1 = predictions["correct"].float().mean().item()
        return round(loss / count, 4), round(top1, 4), predictions

    def keep_if_best(
        self,
        epoch: int,
        val_loss: float | None,
        val_top1: float | None,
        val_predictions: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Best = highest val top-1, then lowest val loss; without validation, the last epoch."""
        key = (val_top1 or 0.0, -(val_loss or 0.0))
        if self.best_key is None or key >= self.best_key or val_top1 is None:
            self.best_key, self.best_epoch, self.best_val = key, epoch, val_predictions
            self.best_state = copy.deepcopy({k: v.cpu() for k, v in self.net.state_dict().items()})

    def write_metrics(self, out_dir: Path) -> None:
        """metrics.json: the history of epochs so far."""
        text = json.dumps(self.history, indent=2)
        atomic_write(BundleLayout(out_dir).metrics, lambda path: path.write_text(text))

    def calibrated_threshold(self) -> Calibration:
        """The "unknown" threshold from the best epoch's val answers (models.metrics'
        choose_threshold: the target precision where it leaves the service useful)."""
        if self.best_val is None:
            calibration = Calibration(None, "no validation split")
        else:
            calibration = choose_threshold(
                self.best_val["confidences"].numpy(),
                self.best_val["correct"].numpy(),
                self.config.target_precision,
            )
        log.info("%s", calibration.describe())
        for record in self.history:  # shown beside the epoch whose answers it was chosen on
            if record["epoch"] == self.best_epoch and self.best_val is not None:
                record["unknown_threshold"] = calibration.to_dict()
        return calibration

    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to continue after this epoch, as tensors and plain containers
        (loadable with weights_only=True), written atomically."""
        state = {
            "config": _resume_key(self.config),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best_state": self.best_state,
            "best_key": list(self.best_key) if self.best_key is not None else None,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint of the same configuration, if there is one."""
        if not path.is_file():
            log.warning("--resume: no checkpoint at %s, starting from epoch 1", path)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != _resume_key(self.config):
            raise ValueError(
                f"--resume: {path} was written by a run with other settings; rerun with the "
                "same settings, or delete it to start afresh"
            )
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.best_state = state["best_state"]
        self.best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        self.best_epoch, self.best_val = state["best_epoch"], state["best_val"]
        log.info("resuming after epoch %d from %s", len(self.history), path)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.startswith("cuda")
        x = x.to(self.device, non_blocking=non_blocking)
        if non_blocking:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=non_blocking)


def _resume_key(config: TrainConfig) -> str:
    """The settings a resumed run must share with the interrupted one, as JSON."""
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUME_MAY_DIFFER}
    return json.dumps(settings, sort_keys=True)


def _describe(record: dict) -> str:
    parts = [f"train_loss={record['train_loss']:.4f}"]
    if record["val_loss"] is not None:
        parts.append(f"val_loss={record['val_loss']:.4f} val_top1={record['val_top1']:.3f}")
    parts.append(f"({record['seconds']:.1f}s)")
    return " ".join(parts)
