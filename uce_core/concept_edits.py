"""Concepts the user steers: given masks as concepts, and edits of a concept set (keep, drop, merge, split, names).

Both run between localization and token learning and return ordinary ``Concepts``, so training does not know the
difference. Concept numbers are the overlay's (1..N, ``Concepts.overlay``).

**Masks on the latent grid** (``masks_to_grid``). A mask is binarised at 0.5 (a pixel >= 0.5 is in it), mapped onto
the image as the model saw it (a mask of the user's original image is cropped the way the capture cropped the image;
a mask of the working image is used as it is; any other aspect ratio is refused), and a grid cell is in the mask iff
at least half of the cell's area is covered (exact area fractions, also when the pixel count is not a multiple of the
grid). A mask that covers no cell by half still gets the one cell it covers most (the first such cell in row-major
order on ties), so a small painted object is never lost.

**f_i of a given mask**: eq. 6, the mean of the captured self-attention rows (as localization prepares them) over the
mask's cells; its EOT score the same ratio as a found concept's (``regions.eot_scores``).

**Merging** ("2+5"): the union of the masks; f_i by the post-clustering's rule (``LocalizeSettings.features``):
"reference" = the unweighted mean of the member candidate regions' rows, i.e. the members' f_i weighted by how many
candidate regions each holds (``info["candidates"]``; a given mask or a split piece counts as one region); "paper" =
eq. 6 over the union (recomputed from the attention when the concepts carry it). Merges chain: "2+5, 5+7" is one
concept.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch

from .concepts import Concepts
from .errors import ConceptExpressError

MASK_MODES = ("replace", "add")
MAX_LABEL_COLOURS = 64  # LocalizeConcepts' n_max limit: more colours is a photograph or an anti-aliased drawing
TOLERANCE = 0.01  # relative aspect-ratio difference still counted as the same picture (rounding of resized images)


# ---------------------------------------------------------------------------------------------------------- masks


def label_image_masks(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(K, H, W) float masks from a label image (H, W, 3 or 4; uint8 or float 0..1): one per distinct colour, in the
    order their first pixel appears (row by row). Black and fully transparent pixels belong to no concept."""
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ConceptExpressError(f"a label image must be (height, width, 3 or 4), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    colours = array[..., :3].reshape(-1, 3).astype(np.int64)
    codes = colours[:, 0] << 16 | colours[:, 1] << 8 | colours[:, 2]
    background = codes == 0
    if array.shape[-1] == 4:
        background |= array[..., 3].reshape(-1) == 0
    codes = np.where(background, -1, codes)
    unique, first = np.unique(codes, return_index=True)
    order = [c for _, c in sorted(zip(first, unique)) if c >= 0]
    if not order:
        raise ConceptExpressError(
            "the label image is all black (or transparent): paint each concept in its own colour on black."
        )
    if len(order) > MAX_LABEL_COLOURS:
        raise ConceptExpressError(
            f"the label image has {len(order)} colours; at most {MAX_LABEL_COLOURS} concepts are allowed. A label "
            "image needs flat colours, one per concept, on black: save it as PNG (JPEG and smoothed edges add "
            "colours), or give the concepts as masks instead."
        )
    h, w = array.shape[:2]
    return torch.from_numpy(np.stack([(codes == c).reshape(h, w) for c in order]).astype(np.float32))


def _cover(length: int, start: float, stop: float, cells: int) -> np.ndarray:
    """(cells, length) float64: the fraction of cell i of [start, stop) (split into ``cells`` equal parts) that
    pixel p = [p, p+1) covers."""
    edges = start + (stop - start) * np.arange(cells + 1) / cells
    pixels = np.arange(length + 1, dtype=np.float64)
    low = np.maximum(edges[:-1, None], pixels[None, :-1])
    high = np.minimum(edges[1:, None], pixels[None, 1:])
    return np.clip(high - low, 0, None) / ((stop - start) / cells)


def _mask_box(mask_size: tuple[int, int], info: dict, working: tuple[int, int]) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) of the working image inside a mask of ``mask_size`` (height, width)."""
    mh, mw = mask_size
    aspect = mw / mh
    size, box = info.get("source_size"), info.get("source_crop")
    if size and box:
        sw, sh = size
        if abs(aspect / (sw / sh) - 1) <= TOLERANCE:
            fx, fy = mw / sw, mh / sh
            return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy
    wh, ww = working
    if abs(aspect / (ww / wh) - 1) <= TOLERANCE:
        return 0.0, 0.0, float(mw), float(mh)
    source = f"{size[0]}x{size[1]}" if size else f"{ww}x{wh}"
    raise ConceptExpressError(
        f"a mask of {mw}x{mh} pixels does not fit the image ({source}): its aspect ratio differs. Give masks of "
        "this image (e.g. Load Image's mask, or a mask node fed with the same image), or resize them to its size."
    )


def check_masks(masks: torch.Tensor) -> torch.Tensor:
    """The (K, H, W) masks binarised at 0.5; refuses a batch that is not one or an empty mask in it."""
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3 or masks.shape[0] == 0:
        raise ConceptExpressError(f"masks must be a (count, height, width) batch, got shape {tuple(masks.shape)}")
    binary = masks.detach().cpu().double() >= 0.5
    for i in range(binary.shape[0]):
        if not binary[i].any():
            raise ConceptExpressError(
                f"mask {i + 1} of {binary.shape[0]} is empty (no pixel >= 0.5): paint the concept (e.g. in Load "
                "Image's mask editor: right-click the image, Open in MaskEditor), or leave that mask out."
            )
    return binary


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int], info: dict | None = None, working=None) -> torch.Tensor:
    """(K, H, W) masks (any resolution, values 0..1) -> (K, h, w) bool on the latent grid (the module's rule).

    ``info`` (the attention's or concepts' info: ``source_size``, ``source_crop``) and ``working`` (the working
    image's (height, width)) place the mask on the image the model saw; without them the mask is that image."""
    binary = check_masks(masks).numpy().astype(np.float64)
    k, mh, mw = binary.shape
    h, w = grid
    left, top, right, bottom = _mask_box((mh, mw), info or {}, working or (mh, mw))
    rows, cols = _cover(mh, top, bottom, h), _cover(mw, left, right, w)
    fraction = np.einsum("iy,kyx,jx->kij", rows, binary, cols)
    out = fraction >= 0.5 - 1e-9
    for i in range(k):
        if not out[i].any():
            if fraction[i].max() <= 0:
                raise ConceptExpressError(
                    f"mask {i + 1} of {k} lies outside the part of the image the model sees (it was cropped away); "
                    "paint inside the image, or capture with resize 'stretch'."
                )
            out[i].flat[int(np.argmax(fraction[i]))] = True
    return torch.from_numpy(out)


def mean_rows(rows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """f_i of eq. 6 for (possibly overlapping) masks: the mean of ``rows`` over each mask's cells, float32 (K, n)."""
    weights = masks.reshape(masks.shape[0], -1).to(rows.device, torch.float64)
    return ((weights @ rows.double()) / weights.sum(1, keepdim=True).clamp(min=1)).float()


def mask_scores(maps, masks: torch.Tensor) -> torch.Tensor:
    """EOT scores of (possibly overlapping) grid masks: mean normalised EOT in the mask / its mean over the grid."""
    from .localize import normalised_eot

    try:
        eot = normalised_eot(maps, torch.device("cpu")).reshape(-1).double()
    except ConceptExpressError:  # a flat EOT map: no mask stands out (scores only reported for given masks)
        return torch.ones(masks.shape[0])
    flat = masks.reshape(masks.shape[0], -1).double()
    return ((flat @ eot) / flat.sum(1).clamp(min=1) / eot.mean()).float()


def concepts_from_masks(maps, masks: torch.Tensor, mode: str = "replace", found: Concepts | None = None) -> Concepts:
    """Concepts from given masks on the attention ``maps``.

    ``mode`` "replace": the masks are the concepts, in the given order. "add": ``found`` (localization's result) plus
    the masks; a mask covering more than half of a found concept replaces it, at that concept's number (the first
    free one if it covers several; the others are removed), and a mask that replaces none is appended."""
    from ..uce_kernels import prepare_distributions

    if mode not in MASK_MODES:
        raise ConceptExpressError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if mode == "add" and found is None:
        raise ConceptExpressError("mode 'add' needs the concepts localization found")
    grid_masks = masks_to_grid(masks, maps.grid, maps.info, tuple(maps.image.shape[:2]))
    rows = prepare_distributions(maps.self_attention)
    given = Concepts(
        grid_masks,
        mean_rows(rows, grid_masks).cpu(),
        mask_scores(maps, grid_masks),
        maps.grid,
        maps.image,
        {**maps.info, "given_masks": len(grid_masks), "mask_mode": mode, "candidates": [1] * len(grid_masks)},
        attention=maps,
    )
    if mode == "replace":
        given.info["origin"] = [f"mask {i + 1}" for i in range(len(given))]
        return given
    return _add(found, given, maps)


def _add(found: Concepts, given: Concepts, maps) -> Concepts:
    f, g = found.masks.reshape(len(found), -1).double(), given.masks.reshape(len(given), -1).double()
    covered = (g @ f.T) / f.sum(1).clamp(min=1)  # (given, found): the share of each found concept a mask covers
    replaces = covered > 0.5
    slot_of: dict[int, int] = {}  # found index -> given index taking its place
    appended = []
    for j in range(len(given)):
        free = [i for i in torch.nonzero(replaces[j]).flatten().tolist() if i not in slot_of]
        if free:
            slot_of[free[0]] = j
        else:
            appended.append(j)
    picks: list[tuple[str, int]] = []
    for i in range(len(found)):
        if i in slot_of:
            picks.append(("given", slot_of[i]))
        elif not replaces[:, i].any():
            picks.append(("found", i))
    picks += [("given", j) for j in appended]
    source = {"found": found, "given": given}
    candidates = {"found": found.info.get("candidates") or [1] * len(found), "given": [1] * len(given)}
    info = {
        **found.info,
        "given_masks": len(given),
        "mask_mode": "add",
        "replaced": [i + 1 for i in range(len(found)) if replaces[:, i].any()],
        "candidates": [candidates[kind][k] for kind, k in picks],
        "origin": [f"{'mask' if kind == 'given' else 'found'} {k + 1}" for kind, k in picks],
    }
    return Concepts(
        torch.stack([source[kind].masks[k] for kind, k in picks]),
        torch.stack([source[kind].features[k] for kind, k in picks]),
        torch.stack([source[kind].scores[k].float() for kind, k in picks]),
        found.grid,
        found.image,
        info,
        attention=maps,
    )


# ---------------------------------------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class ConceptEdits:
    """Edits in the overlay's numbering (1-based). Empty strings / False = no edit (the concepts pass through).

    keep: "1,3,4" (only these); drop: "2" (all but these); merge: "2+5, 3+4" (chains allowed); split_instances:
    each concept with several connected pieces of at least ``split_min_area`` (fraction of the image) becomes one
    concept per piece (smaller specks of a split concept are left out); names: "dog, teapot, lamp" for the concepts
    after the edit, in the new overlay's order (an empty entry keeps the default name)."""

    keep: str = ""
    drop: str = ""
    merge: str = ""
    split_instances: bool = False
    split_min_area: float = 0.01
    names: str = ""

    @property
    def is_noop(self) -> bool:
        return not (self.keep.strip() or self.drop.strip() or self.merge.strip() or self.split_instances) and not (
            self.names.strip(" ,")
        )


def _numbers(text: str, what: str, count: int) -> list[int]:
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        if not part.isdigit():
            raise ConceptExpressError(f'{what}: {part!r} is not a concept number; write numbers like "1,3,4".')
        number = int(part)
        if not 1 <= number <= count:
            raise ConceptExpressError(
                f"{what}: there is no concept {number}; the overlay numbers the {count} concept(s) 1 to {count}."
            )
        out.append(number)
    return out


def _merge_groups(text: str, count: int) -> list[int]:
    """Union-find over "a+b, c+d": the group root (smallest member, 0-based) of each concept."""
    parent = list(range(count))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in re.split(r"[,;]", text):
        if not group.strip():
            continue
        if "+" not in group:
            raise ConceptExpressError(f'merge: {group.strip()!r} has no "+"; write groups like "2+5, 3+4".')
        members = [n - 1 for n in _numbers(group.replace("+", " "), "merge", count)]
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(count)]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a 2-D bool mask, ordered by their first cell (row-major)."""
    labels = np.full(mask.shape, -1, dtype=np.int64)
    pieces = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start] >= 0:
            continue
        k, stack = len(pieces), [start]
        labels[start] = k
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and labels[ny, nx] < 0:
                    labels[ny, nx] = k
                    stack.append((ny, nx))
        pieces.append(labels == k)
    return pieces


def _rows_of(concepts: Concepts, what: str) -> torch.Tensor:
    from ..uce_kernels import prepare_distributions

    if concepts.attention is None:
        raise ConceptExpressError(
            f"{what} needs the captured attention, which these concepts no longer carry (they were loaded from a "
            "file): run Localize Concepts (or 'concept-express extract') again and edit its result."
        )
    return prepare_distributions(concepts.attention.self_attention)


def edit_concepts(concepts: Concepts, edits: ConceptEdits) -> Concepts:
    """Apply ``edits`` (see ``ConceptEdits``): merge, then keep/drop (a merged concept is kept when keep names any
    of its members, dropped when drop names any), then split, then names. Returns the concepts unchanged (the same
    object) when there is nothing to do."""
    if edits.is_noop:
        return concepts
    n = len(concepts)
    keep = _numbers(edits.keep, "keep", n)
    drop = _numbers(edits.drop, "drop", n)
    roots = _merge_groups(edits.merge, n) if edits.merge.strip() else list(range(n))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        groups.setdefault(r, []).append(i)
    chosen = [
        members
        for _, members in sorted(groups.items())
        if (not keep or any(m + 1 in keep for m in members)) and not any(m + 1 in drop for m in members)
    ]
    if not chosen:
        raise ConceptExpressError(
            f"the edit leaves no concept (keep {edits.keep!r}, drop {edits.drop!r}); keep at least one of the "
            f"{n} concept(s) numbered in the overlay."
        )
    rule = concepts.info.get("settings", {}).get("features", "reference")
    candidates = list(concepts.info.get("candidates") or [1] * n)
    masks, features, scores, counts, origins = [], [], [], [], []
    for members in chosen:
        union = concepts.masks[members].any(0)
        if len(members) == 1:
            f, s = concepts.features[members[0]], concepts.scores[members[0]]
        else:
            f = _merged_features(concepts, members, union, candidates, rule)
            s = _score(concepts, union, members)
        masks.append(union)
        features.append(f)
        scores.append(s)
        counts.append(sum(candidates[m] for m in members))
        origins.append("+".join(str(m + 1) for m in members))
    out_masks, out_features, out_scores = torch.stack(masks), torch.stack(features), torch.stack(scores).float()
    if edits.split_instances:
        out_masks, out_features, out_scores, counts, origins = _split(
            concepts, out_masks, out_features, out_scores, counts, origins, edits.split_min_area
        )
    info = {
        **concepts.info,
        "candidates": counts,
        "origin": origins,
        "edits": dataclasses.asdict(edits),
    }
    info.pop("names", None)
    result = Concepts(
        out_masks, out_features, out_scores, concepts.grid, concepts.image, info, attention=concepts.attention
    )
    if edits.names.strip(" ,"):
        result.info["names"] = parse_names(edits.names, len(result))
    return result


def _merged_features(concepts, members, union, candidates, rule) -> torch.Tensor:
    if rule == "paper":
        if concepts.attention is not None:
            return mean_rows(_rows_of(concepts, "merge"), union[None])[0]
        weights = torch.tensor([float(concepts.masks[m].sum()) for m in members], dtype=torch.float64)
    else:
        weights = torch.tensor([float(candidates[m]) for m in members], dtype=torch.float64)
    f = (weights[:, None] * concepts.features[members].double()).sum(0) / weights.sum()
    return f.float()


def _score(concepts, union, members) -> torch.Tensor:
    if concepts.attention is not None:
        return mask_scores(concepts.attention, union[None])[0]
    # without the EOT map: the area-weighted mean of the members' scores (exact for disjoint members)
    areas = torch.tensor([float(concepts.masks[m].sum()) for m in members], dtype=torch.float64)
    return ((areas * concepts.scores[members].double()).sum() / areas.sum()).float()


def _split(concepts, masks, features, scores, counts, origins, min_area):
    limit = min_area * masks[0].numel()
    out = ([], [], [], [], [])
    rows = None
    for i in range(len(masks)):
        pieces = [p for p in _components(masks[i].numpy()) if p.sum() >= limit]
        if len(pieces) < 2:
            for lst, value in zip(out, (masks[i], features[i], scores[i], counts[i], origins[i])):
                lst.append(value)
            continue
        rows = _rows_of(concepts, "split_instances") if rows is None else rows
        piece_masks = torch.from_numpy(np.stack(pieces))
        piece_features = mean_rows(rows, piece_masks)
        piece_scores = mask_scores(concepts.attention, piece_masks)
        for k in range(len(pieces)):
            out[0].append(piece_masks[k])
            out[1].append(piece_features[k])
            out[2].append(piece_scores[k])
            out[3].append(1)
            out[4].append(f"{origins[i]}.{k + 1}")
    return torch.stack(out[0]), torch.stack(out[1]), torch.stack(out[2]).float(), out[3], out[4]


def parse_names(text: str, count: int) -> list[str | None]:
    """Sanitised embedding names, one per concept (None = the default name); refuses more names than concepts and
    names that are the same after sanitising."""
    from .export import sanitize_name

    parts = [p.strip() for p in text.split(",")]
    while parts and not parts[-1]:
        parts.pop()
    if len(parts) > count:
        raise ConceptExpressError(
            f"names: {len(parts)} names for {count} concept(s); give at most one name per concept, in the order of "
            "the edited overlay."
        )
    names = [sanitize_name(p, f"name {i + 1}") if p else None for i, p in enumerate(parts)]
    names += [None] * (count - len(names))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if name.lower() in seen:
            raise ConceptExpressError(
                f"names: concepts {seen[name.lower()] + 1} and {i + 1} would both be called {name!r} (after "
                "keeping only letters, digits, '-', '_' and '.'); give each concept its own name."
            )
        seen[name.lower()] = i
    return names


def embedding_names(concepts: Concepts, prefix: str) -> list[str]:
    """The embedding (file) names of a concept set: the user's name where one was given, else ``<prefix>_<i>`` with
    i the concept's number (``export.export_names``). Refuses a set in which two concepts would get the same name."""
    from .export import chosen_names, export_names

    return export_names([""] * len(concepts), prefix, chosen_names(concepts.info))
