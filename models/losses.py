"""Metric-learning losses beside the classifier's cross-entropy, from pytorch-metric-learning.

The classifier's loss shapes the embedding only through the class weights; a pair loss on the
embeddings themselves pulls images of a class together and pushes other classes away, which is
what retrieval (R@1, MAP@R) measures. Multi-Similarity (Wang et al., CVPR 2019) weighs each
pair in the batch by how hard it is, after its miner keeps the informative pairs; it has no
parameters of its own, so the optimiser and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

METRIC_LOSSES = ("none", "multi-similarity")

MetricLoss = Callable[[Tensor, Tensor], Tensor]  # (embeddings (N, D), labels (N,)) -> loss


def metric_loss(name: str) -> MetricLoss | None:
    """The named loss on (embeddings, labels), or None for "none"."""
    if name == "none":
        return None
    if name != "multi-similarity":
        raise ValueError(f"unknown metric loss {name!r}; choose one of: {', '.join(METRIC_LOSSES)}")
    from pytorch_metric_learning import losses, miners

    loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()

    def multi_similarity(embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings, labels = whole_batch(embeddings.float(), labels)
        return loss(embeddings, labels, miner(embeddings, labels))

    return multi_similarity


def whole_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Under DistributedDataParallel, every process's part of the batch, so that a pair loss
    sees the pairs a single process would (the loss is then the same on every rank; the
    gather's backward sums its gradients over the ranks and DDP averages them: the single
    process's gradient). Outside it, the inputs."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return embeddings, labels
    from torch.distributed.nn.functional import all_gather

    gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, labels)
    return torch.cat(all_gather(embeddings)), torch.cat(gathered)
