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
from torch import Tensor, nn

METRIC_LOSSES = ("none", "multi-similarity", "proxy-anchor")

MetricLoss = Callable[[Tensor, Tensor], Tensor]  # (embeddings (N, D), labels (N,)) -> loss


def metric_loss(name: str, class_rows: nn.Parameter) -> MetricLoss | None:
    """The named loss on (embeddings, labels), or None for "none". class_rows (C, D) are the
    classifier's weights: Proxy-Anchor's proxies."""
    if name == "none":
        return None
    if name not in METRIC_LOSSES:
        raise ValueError(f"unknown metric loss {name!r}; choose one of: {', '.join(METRIC_LOSSES)}")
    from pytorch_metric_learning import losses, miners

    if name == "proxy-anchor":
        # Proxy-Anchor (Kim et al., CVPR 2020) pulls each batch's images to their class's proxy
        # and pushes them from the others'. Its proxies are the cosine classifier's rows, so
        # there is one set of class vectors, trained by both losses and saved as before.
        proxy_anchor = losses.ProxyAnchorLoss(*class_rows.shape)
        proxy_anchor.proxies = class_rows
        return lambda embeddings, labels: proxy_anchor(embeddings.float(), labels)
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
