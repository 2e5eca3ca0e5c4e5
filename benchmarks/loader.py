"""Is the input pipeline the bottleneck? Training steps/s on real images vs tensors in memory.

Both runs do the same training step (forward + backward + AdamW step) on batches of the same
shape. "loader": Tux Paint stamps read, augmented and batched by the training DataLoader
(`workers` processes) with the decoded-image cache training uses: the first pass over the
images decodes them (timed apart), later ones read the cache. "memory": the same number of
batches, made beforehand and held as tensors. Ratio = loader / memory; the target is >= 0.9.

    python -m benchmarks.loader [--backbone NAME] [--workers N] [--batch-size B] [--image-size PX]

Writes benchmarks/loader.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.transfer import STAMPS
from models.backbones import preprocessing_for
from models.data import ImageDataset, find_images, label_of
from models.network import build_net
from models.transforms import train_transform

OUT = Path(__file__).with_name("loader.md")


def steps_per_second(net: torch.nn.Module, batches, steps: int, warmup: int = 3) -> float:
    """Time `steps` training steps after `warmup` untimed ones."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net.train()
    iterator = iter(batches)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        x, y = next(iterator)
        loss = F.cross_entropy(net(x).logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    paths = find_images(args.stamps)
    names = sorted({label_of(path, args.stamps) for path in paths})
    labels = [names.index(label_of(path, args.stamps)) for path in paths]
    pre = preprocessing_for(args.backbone)
    with tempfile.TemporaryDirectory() as cache:
        dataset = ImageDataset(paths, pre, train_transform(pre), labels, Path(cache))
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        started = time.perf_counter()
        in_memory = [batch for batch in loader]  # the first pass: decodes and fills the cache
        first_pass = len(paths) / (time.perf_counter() - started)
        torch.manual_seed(0)
        net = build_net(args.backbone, len(names), "none")
        steps = args.steps
        assert len(in_memory) >= steps + 3, "not enough images for the steps asked"
        memory = steps_per_second(net, in_memory, steps)
        real = steps_per_second(net, loader, steps)  # workers start inside the timed warm-up
    ratio = real / memory
    lines = [
        "# Input pipeline benchmark",
        "",
        f"`python -m benchmarks.loader --backbone {args.backbone} --workers {args.workers} "
        f"--batch-size {args.batch_size} --steps {steps}`",
        "",
        f"{args.backbone} training steps (forward, backward, AdamW), batches of {args.batch_size} "
        f"{pre.crop_size} px crops; {len(paths)} Tux Paint stamps (PNG with alpha), "
        f"{args.workers} DataLoader workers doing augmentation; torch threads: "
        f"{torch.get_num_threads()}; CPU only, {os.cpu_count()} cores. The first pass decodes "
        f"every image once into the cache at {first_pass:.0f} images/s (untimed below).",
        "",
        "| input | steps/s |",
        "|---|---|",
        f"| tensors in memory | {memory:.2f} |",
        f"| DataLoader on real images | {real:.2f} |",
        f"| **ratio** | **{ratio:.2f}** (target >= 0.9) |",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
