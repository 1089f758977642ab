"""FINCH (Sarfraz et al., CVPR 2019) over rows under the symmetric KL, as ConceptExpress uses it (paper eqs. 2-4 and
sec. 3.2; reference-spec 1.5 and 1.8).

One level: every node's first neighbour kappa_i = argmin_j d(a_i, a_j) (eqs. 3-4), the graph G of eq. 2 (i ~ j iff
kappa_i = j, kappa_j = i or kappa_i = kappa_j) and its connected components. The nodes of the next level are the
clusters, each the mean of its ORIGINAL member rows (not a mean of means). Stop rule, as the reference's loop: a level
with one cluster, or with no fewer clusters than the level before, ends the hierarchy and is dropped; a level with
exactly one cluster fewer than the level before is kept and ends it.

``constrained_finch`` is the post-clustering: the same loop over candidate regions, where an edge of G is cut when its
distance exceeds delta or when its two regions do not touch (4-connectivity), touching being recomputed at every
level from the merged regions. ``finch_with_count`` is FINCH's "required number of clusters" mode (a baseline).

The maths (distances, first neighbours, components, means) lives in ``concept_express.uce_kernels``; this module wires it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..uce_kernels import (
    cluster_means,
    connected_components,
    first_neighbour_clusters,
    prepare_distributions,
    sym_kl_first_neighbours,
    sym_kl_pair_distances,
)
from .regions import relabel, touching


@dataclass(frozen=True)
class KernelOptions:
    """How first neighbours are searched (passed to ``uce_kernels.sym_kl_first_neighbours``)."""

    backend: str = "auto"  # "auto" | "triton" | "torch"
    precision: str = "ieee"  # Triton's dot precision: "ieee" | "tf32x3" | "tf32"
    mode: str = "fast"  # torch path: "fast" | "reference" (the reference's numpy float32 arithmetic, bit for bit)

    def first_neighbours(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sym_kl_first_neighbours(nodes, backend=self.backend, precision=self.precision, mode=self.mode)


@dataclass(frozen=True)
class Edges:
    """Undirected edges of G, each once (src, dst), with the reference's adjacency count (``(K+I)(K+I)^T``: 2 for a
    mutual first-neighbour pair, 1 otherwise) and the distance d(src, dst)."""

    src: torch.Tensor
    dst: torch.Tensor
    count: torch.Tensor
    distance: torch.Tensor


@dataclass(frozen=True)
class Graph:
    """The first-neighbour graph of eq. 2 over m nodes: kappa (m,) and d(i, kappa_i) (m,)."""

    kappa: torch.Tensor
    distance: torch.Tensor

    def edges(self, nodes: torch.Tensor | None = None) -> Edges:
        """The edges of G. With the node rows given, all of them: the first-neighbour edges i - kappa_i and the pairs
        that share a first neighbour (their distances computed here). Without, the first-neighbour edges only."""
        m = self.kappa.shape[0]
        i = torch.arange(m, device=self.kappa.device)
        mutual = self.kappa[self.kappa] == i
        once = ~mutual | (i < self.kappa)  # a mutual pair is one edge
        src, dst, count = i[once], self.kappa[once], 1 + mutual[once].long()
        distance = self.distance[once]
        if nodes is not None:
            p, q = shared_neighbour_pairs(self.kappa)
            if p.numel():
                src, dst = torch.cat([src, p]), torch.cat([dst, q])
                count = torch.cat([count, torch.ones_like(p)])
                distance = torch.cat([distance, sym_kl_pair_distances(nodes, p, q).to(distance.dtype)])
        return Edges(src, dst, count, distance)


def shared_neighbour_pairs(kappa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (p, q), p != q, with kappa_p = kappa_q, each once (vectorised: nodes sorted by kappa, then every
    node paired with the nodes after it in its group)."""
    m = kappa.shape[0]
    order = torch.argsort(kappa, stable=True)
    _, sizes = torch.unique_consecutive(kappa[order], return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(sizes, 0), sizes)
    position = torch.arange(m, device=kappa.device)
    partners = group_end - position - 1  # nodes after this one in its group
    total = int(partners.sum())
    first = torch.repeat_interleave(position, partners)
    offset = torch.arange(total, device=kappa.device) - torch.repeat_interleave(
        torch.cumsum(partners, 0) - partners, partners
    )
    return order[first], order[first + offset + 1]


@dataclass
class Level:
    """One partition of the points: ``labels`` (num_points,) in 0..num_clusters-1 (numbered in order of each
    cluster's smallest point), the graph over the previous level's nodes that produced it (None when there was a
    single node), and the clusters' rows (the next level's nodes) when the loop computed them."""

    labels: torch.Tensor
    num_clusters: int
    graph: Graph | None
    centroids: torch.Tensor | None = None


@dataclass(frozen=True)
class Hierarchy:
    levels: tuple[Level, ...]

    @property
    def counts(self) -> list[int]:
        return [level.num_clusters for level in self.levels]

    def centroids(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """The mean of the original ``rows`` of each cluster of level ``index`` (kept from the loop when it has it)."""
        level = self.levels[index]
        if level.centroids is None:
            level.centroids = cluster_means(rows, level.labels, level.num_clusters)
        return level.centroids


Partition = Callable[[torch.Tensor, torch.Tensor], tuple["Graph | None", torch.Tensor]]
Centroids = Callable[[torch.Tensor, int], torch.Tensor]


def _grow(rows: torch.Tensor, partition: Partition, centroids: Centroids) -> Hierarchy:
    """The FINCH loop: level 0 over ``rows``, each next level over the ``centroids`` of the last one."""
    point_labels = torch.arange(rows.shape[0], device=rows.device)
    nodes, levels = rows, []
    while True:
        graph, node_labels = partition(nodes, point_labels)
        count, before = int(node_labels.max()) + 1, nodes.shape[0]
        if levels and (count == 1 or count >= before):
            break  # the reference drops the level that ends its loop
        point_labels = node_labels[point_labels]
        levels.append(Level(point_labels, count, graph))
        # Level 0 with one cluster, or with nothing merged, would be followed by a level the reference drops.
        if count == 1 or count >= before or (len(levels) > 1 and before - count == 1):
            break
        nodes = levels[-1].centroids = centroids(point_labels, count)
    return Hierarchy(tuple(levels))


def _single(nodes: torch.Tensor) -> torch.Tensor:
    return torch.zeros(nodes.shape[0], dtype=torch.long, device=nodes.device)


def finch(rows: torch.Tensor, kernel: KernelOptions = KernelOptions()) -> Hierarchy:
    """The FINCH hierarchy of ``rows`` (m, d) (rows are made distributions by ``uce_kernels.prepare_distributions``)."""
    rows = prepare_distributions(rows)

    def partition(nodes, _):
        if nodes.shape[0] == 1:
            return None, _single(nodes)
        kappa, distance = kernel.first_neighbours(nodes)
        return Graph(kappa, distance), first_neighbour_clusters(kappa)

    return _grow(rows, partition, lambda labels, k: cluster_means(rows, labels, k))


def constrained_finch(
    rows: torch.Tensor,
    label_image: torch.Tensor,
    delta: float | None,
    centroids: Centroids | None = None,
    kernel: KernelOptions = KernelOptions(),
) -> Hierarchy:
    """Post-clustering (paper sec. 3.2, reference-spec 1.8): FINCH over K candidate regions whose edges are kept only
    when d <= ``delta`` (None: no cut) and the two regions touch.

    rows: (K, d) the candidates' mean attention rows. label_image: (h, w) candidate of each grid cell, -1 for none.
    centroids(labels, k): the rows of the merged regions; default the unweighted mean of the member candidates' rows
    (the reference), e.g. ``regions.region_means`` over the cells for paper eq. 6.
    """
    rows = prepare_distributions(rows)

    def partition(nodes, point_labels):
        if nodes.shape[0] == 1:
            return None, _single(nodes)
        kappa, distance = kernel.first_neighbours(nodes)
        graph = Graph(kappa, distance)
        edges = graph.edges(nodes)
        keep = touching(relabel(label_image, point_labels), nodes.shape[0])[edges.src, edges.dst]
        if delta is not None:
            keep &= edges.distance <= delta
        return graph, connected_components(nodes.shape[0], edges.src[keep], edges.dst[keep])

    return _grow(rows, partition, centroids or (lambda labels, k: cluster_means(rows, labels, k)))


def finch_with_count(
    rows: torch.Tensor, count: int, hierarchy: Hierarchy | None = None, kernel: KernelOptions = KernelOptions()
) -> torch.Tensor:
    """Labels with exactly ``count`` clusters, FINCH's ``req_clust`` mode: the level with that many clusters if there
    is one; otherwise from the last level with more, merge the closest pair of clusters (the smallest d(i, kappa_i);
    lowest i on ties), recompute the means of the original rows, and repeat. A count above level 0's returns level 0
    (as the reference does)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rows = prepare_distributions(rows)
    hierarchy = hierarchy or finch(rows, kernel)
    counts = hierarchy.counts
    if count >= counts[0]:
        return hierarchy.levels[0].labels
    level = hierarchy.levels[max(i for i, c in enumerate(counts) if c >= count)]
    labels, k = level.labels, level.num_clusters
    while k > count:
        kappa, distance = kernel.first_neighbours(cluster_means(rows, labels, k))
        i = int(torch.argmin(distance))
        j = int(kappa[i])
        merged = torch.arange(k, device=labels.device)
        merged[max(i, j)] = min(i, j)
        labels = torch.unique(merged, return_inverse=True)[1][labels]
        k -= 1
    return labels
