"""FINCH's merge step as tensor ops: connected components, first-neighbour clusters, cluster means.

Pure torch on whatever device the tensors are on: on a CUDA tensor everything stays on the GPU (no scipy, no dense
adjacency, a handful of gather/scatter kernels per round), on a CPU tensor the same code runs on the CPU.
Labels are always 0..k-1, numbered in order of each component's smallest node index.
"""

import torch

from ._device import accumulation_dtype, row_chunks


def connected_components(num_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Weakly connected components of the graph with edges src[e] - dst[e]; int64 labels [num_nodes].

    Min-label hooking with pointer jumping: ``parent`` is a forest in which every node points to a smaller-or-equal
    index. Each round, every tree root that shares an edge with a tree of smaller root hooks under the smallest such
    root (scatter amin), then pointer jumping flattens the forest again. The roots are then the smallest node of each
    component. Every round removes at least one root per unfinished component and in practice about halves the number
    of trees, so a graph needs O(log n) rounds (measured in tests/test_kernels_finch_ops.py).
    """
    src, dst = _edge_list(num_nodes, src, dst)
    parent, _ = _component_roots(num_nodes, src, dst)
    return _number_by_smallest_node(parent)


def first_neighbour_clusters(kappa: torch.Tensor) -> torch.Tensor:
    """FINCH's partition (paper eq. 2: i ~ j iff kappa_i = j, kappa_j = i or kappa_i = kappa_j) from the first-neighbour
    array: exactly the weakly connected components of the edges i - kappa_i."""
    if kappa.dim() != 1:
        raise ValueError(f"kappa must be 1-D, got shape {tuple(kappa.shape)}")
    n = kappa.shape[0]
    return connected_components(n, torch.arange(n, device=kappa.device), kappa)


def cluster_means(rows: torch.Tensor, labels: torch.Tensor, num_clusters: int | None = None) -> torch.Tensor:
    """Mean of the member rows of each cluster, float32 [k, d] in label order (segment sums / counts).

    Sums are accumulated in float64 (float32 on MPS). Non-finite entries count as 0 so that no NaN comes out; a cluster with no member
    (possible only when num_clusters exceeds the labels used) gets a row of zeros.
    """
    if rows.dim() != 2 or labels.dim() != 1 or labels.shape[0] != rows.shape[0]:
        raise ValueError(f"need rows (n, d) and labels (n,), got {tuple(rows.shape)} and {tuple(labels.shape)}")
    labels = labels.to(device=rows.device, dtype=torch.long)
    used = int(labels.max()) + 1 if labels.numel() else 0
    k = used if num_clusters is None else num_clusters
    if labels.numel() and (int(labels.min()) < 0 or used > k):
        raise ValueError(f"labels must lie in [0, {k})")
    sums = _segment_sums(rows, labels, k, finite_only=False)
    if not bool(torch.isfinite(sums).all()):  # a member row holds NaN or inf (a finite float32 sum cannot overflow)
        sums = _segment_sums(rows, labels, k, finite_only=True)
    counts = torch.bincount(labels, minlength=k).clamp(min=1)
    return (sums / counts.unsqueeze(1)).float()


def _segment_sums(rows: torch.Tensor, labels: torch.Tensor, k: int, finite_only: bool) -> torch.Tensor:
    sums = torch.zeros(k, rows.shape[1], dtype=accumulation_dtype(rows.device), device=rows.device)
    for part in row_chunks(rows.shape[0], rows.shape[1], rows.device):
        chunk = rows[part].to(sums.dtype)
        if finite_only:
            chunk = torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
        sums.index_add_(0, labels[part], chunk)
    return sums


def _edge_list(num_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    if src.dim() != 1 or src.shape != dst.shape:
        raise ValueError(f"src and dst must be 1-D of the same length, got {tuple(src.shape)} and {tuple(dst.shape)}")
    src = src.to(torch.long)
    dst = dst.to(device=src.device, dtype=torch.long)
    if src.numel() and (min(int(src.min()), int(dst.min())) < 0 or max(int(src.max()), int(dst.max())) >= num_nodes):
        raise ValueError(f"edge endpoints must lie in [0, {num_nodes})")
    return src, dst


def _component_roots(num_nodes: int, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The smallest node of each node's component, and the number of hooking rounds it took."""
    parent = torch.arange(num_nodes, device=src.device)
    rounds = 0
    while src.numel() > 0:
        root_src, root_dst = parent[src], parent[dst]
        if torch.equal(root_src, root_dst):
            break
        low = torch.minimum(root_src, root_dst)
        parent.scatter_reduce_(0, root_src, low, reduce="amin")
        parent.scatter_reduce_(0, root_dst, low, reduce="amin")
        parent = _flatten(parent)
        rounds += 1
    return parent, rounds


def _flatten(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every node points at its root (O(log depth) steps)."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def _number_by_smallest_node(parent: torch.Tensor) -> torch.Tensor:
    nodes = torch.arange(parent.shape[0], device=parent.device)
    is_root = parent == nodes  # a root is the smallest node of its component, so roots come in label order
    return (torch.cumsum(is_root, dim=0) - 1)[parent]
