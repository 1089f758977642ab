"""An independent float64 numpy re-implementation of ConceptExpress's localization, written for the tests from the
paper (sec. 3.2, eqs. 2-6) and the reference spec (sections 1.4-1.8): dense distance matrices, the adjacency
(K+I)(K+I)^T, scipy's connected components, an explicit pixel union-find for the touching test, and the reference's
loop, level rule and delta bookkeeping written out literally. It shares no code with concept_express.
"""

import numpy as np
from oracles import bilinear_axis
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def sym_kl(a: np.ndarray) -> np.ndarray:
    """Dense d(a_i, a_j) = (KL(a_i||a_j) + KL(a_j||a_i)) / 2, float64 (eq. 3)."""
    a = a.astype(np.float64)
    log = np.log(a)
    kl = (a * log).sum(1)[:, None] - a @ log.T
    return (kl + kl.T) / 2


def first_neighbours(a: np.ndarray):
    """kappa (eq. 4) and the distance matrix with the diagonal excluded (inf)."""
    d = sym_kl(a)
    np.fill_diagonal(d, np.inf)
    return d.argmin(1), d


def nearest_gap(a: np.ndarray) -> float:
    """Smallest relative gap between each row's best and second-best neighbour (how safe argmins are)."""
    _, d = first_neighbours(a)
    two = np.sort(d, axis=1)[:, :2]
    return float(((two[:, 1] - two[:, 0]) / np.maximum(two[:, 1], 1e-30)).min())


def adjacency(kappa: np.ndarray) -> np.ndarray:
    """The reference's (K+I)(K+I)^T with a zero diagonal (counts: 2 for mutual pairs, 1 otherwise)."""
    m = len(kappa)
    k = np.eye(m)
    k[np.arange(m), kappa] += 1
    a = k @ k.T
    np.fill_diagonal(a, 0)
    return a


def canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in order of first occurrence (a cluster's number is the rank of its first point)."""
    number = {}
    return np.array([number.setdefault(label, len(number)) for label in labels.tolist()], dtype=np.int64)


def components(adj: np.ndarray) -> np.ndarray:
    _, labels = connected_components(csr_matrix(adj != 0), directed=True, connection="weak")
    return canonical(labels)


def count_components(grid: np.ndarray) -> int:
    """4-connected components of a binary grid, by an explicit union-find over its cells."""
    parent = {}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    h, w = grid.shape
    for y in range(h):
        for x in range(w):
            if grid[y, x]:
                parent[(y, x)] = (y, x)
    for y in range(h):
        for x in range(w):
            if not grid[y, x]:
                continue
            for ny, nx in ((y - 1, x), (y, x - 1)):
                if ny >= 0 and nx >= 0 and grid[ny, nx]:
                    parent[find((y, x))] = find((ny, nx))
    return len({find(c) for c in parent})


def connect(masks: np.ndarray) -> np.ndarray:
    """connect[i, j] = 1 iff the union of masks i and j has fewer components than the two apart (spec 1.8)."""
    b = len(masks)
    out = np.zeros((b, b))
    counts = [count_components(m) for m in masks]
    for i in range(b):
        for j in range(i + 1, b):
            if count_components(masks[i] | masks[j]) < counts[i] + counts[j]:
                out[i, j] = out[j, i] = 1
    return out


def means(data: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.stack([data[labels == c].mean(0) for c in range(labels.max() + 1)])


def finch(data: np.ndarray, min_sim=None, masks=None):
    """The reference loop of clustering/finch.py as spec 1.5/1.8 describes it. Returns (levels: list of point
    labels, counts, min_sim_list). ``masks`` (m, h, w) bool turns on the touching constraint."""
    data = data.astype(np.float64)

    def level(nodes, node_masks):
        kappa, d = first_neighbours(nodes)
        adj = adjacency(kappa)
        if min_sim is not None:
            adj[d > min_sim] = 0
        if node_masks is not None:
            adj[connect(node_masks) == 0] = 0
        d0 = d.copy()
        np.fill_diagonal(d0, 1e12)
        return components(adj), float(np.max(d0 * adj))

    def merged(labels):
        return None if masks is None else np.stack([masks[labels == c].any(0) for c in range(labels.max() + 1)])

    labels, _ = level(data, masks)
    levels, counts, min_sims = [labels], [labels.max() + 1], [min_sim]
    exit_clust = 2
    while exit_clust > 1:
        u, min_s = level(means(data, levels[-1]), merged(levels[-1]))
        new = u[levels[-1]]
        count = new.max() + 1
        exit_clust = counts[-1] - count
        if count == 1 or exit_clust < 1:
            break
        levels.append(new)
        counts.append(count)
        min_sims.append(min_s)
    return levels, counts, min_sims


def reference_level(counts, n_max=10):
    """train.py's loop; raises exactly where the reference does (UnboundLocalError / IndexError)."""
    for i, num in enumerate(counts):
        if num >= n_max and counts[i + 1] < n_max:
            index = i
            break
    return index  # noqa: F821 -- unbound when no level qualifies, as in the reference


def eot_on_grid(eot: np.ndarray, grid) -> np.ndarray:
    """Bilinear upsampling (align_corners=False) and min-max normalisation (spec 1.7)."""
    e = bilinear_axis(eot.shape[0], grid[0]) @ eot.astype(np.float64) @ bilinear_axis(eot.shape[1], grid[1]).T
    return (e - e.min()) / (e.max() - e.min())


def level_zero_delta(x: np.ndarray) -> float:
    """concept_express's delta where the reference has none (level 0 chosen): max over the cells' first-neighbour
    edges of count * d, a mutual pair counting 2 (docs/deviations.md, "Stage 2")."""
    kappa, d = first_neighbours(x.astype(np.float64))
    mutual = kappa[kappa] == np.arange(len(kappa))
    return float(np.max((1 + mutual) * d[np.arange(len(kappa)), kappa]))


def localize(x: np.ndarray, eot: np.ndarray, grid, n_max=10, level_zero=False):
    """The whole stage: pre-clustering, level, delta, EOT filter, post-clustering. Returns (masks (N, h, w) bool,
    features (N, n), info dict). ``level_zero``: where level 0 is chosen (the reference has no delta there and cuts
    nothing), use ``level_zero_delta`` as concept_express does."""
    levels, counts, min_sims = finch(x)
    index = reference_level(counts, n_max)
    delta = min_sims[index]
    if index == 0 and level_zero:
        delta = level_zero_delta(x)
    labels = levels[index]
    e = eot_on_grid(eot, grid).ravel()
    kept = [c for c in range(labels.max() + 1) if e[labels == c].mean() / e.mean() > 1.0]
    masks = np.stack([(labels == c).reshape(grid) for c in kept])
    feats = np.stack([x[labels == c].astype(np.float64).mean(0) for c in kept])
    post, post_counts, _ = finch(feats, min_sim=delta, masks=masks)
    final = post[-1]
    out_masks = np.stack([masks[final == c].any(0) for c in range(final.max() + 1)])
    out_feats = np.stack([feats[final == c].mean(0) for c in range(final.max() + 1)])
    info = {"counts": counts, "index": index, "delta": delta, "kept": kept, "post_counts": post_counts}
    return out_masks, out_feats, info
