"""Writing learned tokens so that ComfyUI, A1111 and diffusers all load them.

One ``<name>.safetensors`` per concept:

* SD1.x / SD2.x: ``{"emb_params": (1, width)}`` — ComfyUI takes the first value of a plain dict, A1111 and diffusers
  ``load_textual_inversion`` know the ``emb_params`` key;
* SDXL: ``{"clip_l": (1, 768), "clip_g": (1, 1280)}`` — ComfyUI picks the key of each of its two tokenizers;
  diffusers loads each key into its encoder (``load_textual_inversion(state_dict["clip_g"], token=...,
  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``).

Plus ``manifest.json`` (names, files, model family, latent grid, settings, steps, loss history, localization
parameters), one ``<name>_mask.png`` per concept, ``image.png`` (the image as the model saw it), ``concepts.png``
(overlay) and ``loss.png``. ``load_exported`` restores the whole concept set from these. An export that replaces a
set (``overwrite=True``) removes the embedding and mask files of the concepts the new set no longer has, so the
folder's embeddings are exactly the current concepts.

Every file is written atomically (temporary name, then rename). Existing files are never replaced unless
``overwrite=True``; the check covers the whole set before anything is written, so a refused export writes
nothing. Names are sanitised so that no name can leave the output folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConceptExpressError
from .tokens import ConceptTokens

MANIFEST = "manifest.json"
IMAGE = "image.png"
MANIFEST_FORMAT = "concept-express/manifest/2"
# /1 (earlier versions of this project): no latent grid or image entry; vectors, masks and image were read back from a
# "record" file (concept-tokens.safetensors), which ComfyUI also listed as an embedding.
OLDER_MANIFEST_FORMATS = ("concept-express/manifest/1",)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def sanitize_name(name: str, what: str = "name", *, stem: bool = True) -> str:
    """A file-name-safe version of ``name``: letters, digits, '-', '_' and '.'; no leading dot; at most 64 chars.
    Raises ``ConceptExpressError`` when nothing usable is left, or (``stem``: the name is a whole file stem) when it is
    a name Windows reserves (con, nul, com1, ...)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._")[:64]
    if not clean:
        raise ConceptExpressError(f"{what} {name!r} has no usable characters; use letters, digits, '-' or '_'.")
    if stem and clean.lower().split(".")[0] in _WINDOWS_RESERVED:
        raise ConceptExpressError(f"{what} {name!r} is a file name Windows reserves; choose another.")
    return clean


def embedding_tensors(tokens: ConceptTokens, index: int) -> dict[str, torch.Tensor]:
    """The tensors of concept ``index``'s embedding file (see the module docstring)."""
    vectors = [v[index : index + 1].float().contiguous().cpu() for v in tokens.vectors]
    if tokens.family == "sdxl":
        return dict(zip(tokens.encoder_keys, vectors))
    return {"emb_params": vectors[0]}


def export_names(names: list[str], prefix: str | None = None, chosen: list[str | None] | None = None) -> list[str]:
    """The file names an export uses: ``<prefix>_1..N`` with a prefix, else the sanitised ``names``. ``chosen``
    (names the user gave, e.g. Edit Concepts' ``names``; None entries keep the default) replaces the defaults."""
    if prefix:
        clean = sanitize_name(prefix, "prefix", stem=False)
        given = list(chosen or [])[: len(names)]
        given += [None] * (len(names) - len(given))
        out = [sanitize_name(g, f"name of concept {i + 1}") if g else f"{clean}_{i + 1}" for i, g in enumerate(given)]
    else:
        out = [sanitize_name(n) for n in names]
    lowered = [n.lower() for n in out]
    for i, name in enumerate(lowered):
        j = lowered.index(name)
        if j != i:
            raise ConceptExpressError(
                f"concepts {j + 1} and {i + 1} would both be saved as {out[i]!r}; concept names must differ from "
                "each other: choose another name (or another name prefix)."
            )
    return out


def chosen_names(info: dict) -> list[str | None] | None:
    """The names the user gave the concepts (Edit Concepts), from a ``ConceptTokens.info`` (under "localization")
    or a ``Concepts.info``; None when none were given."""
    names = info.get("names", (info.get("localization") or {}).get("names"))
    return list(names) if isinstance(names, list) else None


def check_export_target(folder: Path, names: list[str], overwrite: bool) -> tuple[list[Path], list[Path]]:
    """The embedding and mask paths of an export; raises (writing nothing) if any file of the export exists and
    ``overwrite`` is off. Callers can run it before a long training run."""
    folder = Path(folder)
    embeddings = [folder / f"{n}.safetensors" for n in names]
    masks = [folder / f"{n}_mask.png" for n in names]
    others = [folder / IMAGE, folder / "concepts.png", folder / "loss.png", folder / MANIFEST]
    if not overwrite:
        existing = [p for p in [*embeddings, *masks, *others] if p.exists()]
        if existing:
            raise ConceptExpressError(
                f"{len(existing)} file(s) already exist, e.g. {existing[0]}; nothing was written. "
                "Choose another folder or prefix, or allow overwriting (--overwrite; the node's overwrite input)."
            )
    return embeddings, masks


@dataclass
class ExportResult:
    folder: Path
    embeddings: list[Path]
    manifest: Path
    names: list[str]


def export_tokens(
    tokens: ConceptTokens,
    folder: str | os.PathLike,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> ExportResult:
    """Write the embedding files, masks, previews and the manifest of ``tokens`` into ``folder``.

    ``extra`` (JSON-able) is kept in the manifest under ``source``; ``load_exported`` returns it as ``info["source"]``.

    With ``prefix`` the names become ``<prefix>_1``, ``<prefix>_2``, ...; otherwise ``tokens.names`` are used.
    """
    from safetensors.torch import save_file

    from .fileio import write_atomic, write_text_atomic
    from .previews import loss_curve

    folder = Path(folder)
    names = export_names(tokens.names, prefix, chosen_names(tokens.info))
    embeddings, masks = check_export_target(folder, names, overwrite)
    replaced = _previous_set_files(folder) if overwrite else []
    folder.mkdir(parents=True, exist_ok=True)
    header = {"family": tokens.family, "encoders": ",".join(tokens.encoder_keys)}
    for i, path in enumerate(embeddings):
        tensors = embedding_tensors(tokens, i)
        write_atomic(path, lambda tmp, t=tensors: save_file(t, str(tmp), metadata=header), overwrite)
    height, width = tokens.image.shape[:2]
    for i, path in enumerate(masks):
        picture = _mask_picture(tokens.masks[i], (height, width))
        write_atomic(path, lambda tmp, p=picture: p.save(tmp, format="PNG"), overwrite)
    from PIL import Image

    picture = Image.fromarray(tokens.image.numpy())
    write_atomic(folder / IMAGE, lambda tmp: picture.save(tmp, format="PNG"), overwrite)
    write_atomic(folder / "concepts.png", lambda tmp: overlay(tokens).save(tmp, format="PNG"), overwrite)
    write_atomic(folder / "loss.png", lambda tmp: loss_curve(tokens.history).save(tmp, format="PNG"), overwrite)
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": tokens.family,
        "encoders": tokens.encoder_keys,
        "grid": list(tokens.masks.shape[1:]),
        "image": IMAGE,
        "concepts": [
            {"number": i + 1, "name": n, "file": e.name, "mask": m.name, "original_name": o}
            for i, (n, e, m, o) in enumerate(zip(names, embeddings, masks, tokens.names))
        ],
        "history": tokens.history,
        "info": tokens.info,
        "source": dict(extra or {}),  # the caller's provenance notes (the CLI: image path, model argument)
    }
    manifest_path = write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, default=str), overwrite)
    for stale in set(replaced) - set(embeddings) - set(masks):  # concepts of the replaced set that the new one lacks
        stale.unlink(missing_ok=True)
    return ExportResult(folder, embeddings, manifest_path, names)


def read_manifest(folder: Path) -> dict | None:
    """The manifest in ``folder`` as written by this or an earlier version (None: missing, unreadable, not ours)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and manifest.get("format") in (MANIFEST_FORMAT, *OLDER_MANIFEST_FORMATS)
    return manifest if ours else None


def _previous_set_files(folder: Path) -> list[Path]:
    """The embedding, mask and record files the manifest already in ``folder`` lists (none without a readable one).
    Only names a set's per-concept files can have (.safetensors, _mask.png): an edited manifest cannot make an
    export delete its own manifest, image or previews."""
    manifest = read_manifest(folder) or {}
    names = [manifest.get("record")]
    entries = manifest.get("concepts")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            names += [entry.get("file"), entry.get("mask")]
    return [
        folder / Path(name).name
        for name in names
        if isinstance(name, str) and name.endswith((".safetensors", "_mask.png"))
    ]


def overlay(tokens: ConceptTokens):
    """The image with each concept's mask tinted and numbered (the same picture as ``Concepts.overlay``)."""
    from .concepts import Concepts

    n, cells = len(tokens), tokens.masks[0].numel()
    return Concepts(
        tokens.masks, torch.full((n, cells), 1.0 / cells), torch.ones(n), tuple(tokens.masks.shape[1:]), tokens.image
    ).overlay()


def _mask_picture(mask: torch.Tensor, size: tuple[int, int]):
    from PIL import Image

    big = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return Image.fromarray((big.numpy() * 255).astype("uint8"), "L")


def load_exported(folder: str | os.PathLike) -> ConceptTokens:
    """Read an exported concept set: vectors from the embedding files (exactly what ComfyUI and diffusers load),
    latent masks from the mask pictures (each grid cell is a block of pixels; its centre is read), the image, and
    names, history and settings from the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST if folder.is_dir() else folder
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConceptExpressError(f"{path}: no manifest here; give a folder that an export wrote.") from None
    except ValueError:
        raise ConceptExpressError(f"{path}: the manifest is not valid JSON.") from None
    if isinstance(manifest, dict) and manifest.get("format") in OLDER_MANIFEST_FORMATS:
        raise ConceptExpressError(
            f"{path}: written by an earlier version of concept-express, which this one does not "
            "read; extract the concepts again (with --overwrite, or the node's overwrite)."
        )
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConceptExpressError(f"{path}: not a ConceptExpress manifest.")
    try:
        return _read_set(manifest, path.parent)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ConceptExpressError(
            f"{path}: the concept set is incomplete or was edited ({type(err).__name__}: {err}); export it again."
        ) from None


def _read_set(manifest: dict, root: Path) -> ConceptTokens:
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    keys, family = manifest["encoders"], manifest["family"]

    def read(name):
        file = root / Path(name).name  # names from the manifest never leave its folder
        try:
            if file.suffix == ".safetensors":
                return load_file(str(file))
            with Image.open(file) as im:
                return np.asarray(im.convert("RGB" if name == manifest["image"] else "L"))
        except Exception as err:
            raise ConceptExpressError(f"{file}: cannot be read ({err}).") from None

    image = read(manifest["image"])
    h, w = manifest["grid"]
    ys = ((np.arange(h) + 0.5) * image.shape[0] / h).astype(int)
    xs = ((np.arange(w) + 0.5) * image.shape[1] / w).astype(int)
    vectors: list[list[torch.Tensor]] = [[] for _ in keys]
    masks = []
    for entry in manifest["concepts"]:
        tensors = read(entry["file"])
        wanted = keys if family == "sdxl" else ["emb_params"]
        if set(wanted) - set(tensors):
            raise ConceptExpressError(
                f"{root / entry['file']}: holds {sorted(tensors)}, not the {wanted} of a "
                f"{family} concept; export the set again."
            )
        for e, key in enumerate(wanted):
            value = tensors[key].reshape(-1).float()
            if vectors[e] and value.shape != vectors[e][0].shape:
                raise ConceptExpressError(
                    f"{root / entry['file']}: a {value.numel()}-wide {key} vector where the set's "
                    f"others are {vectors[e][0].numel()} wide; export the set again."
                )
            vectors[e].append(value)
        masks.append(torch.from_numpy(read(entry["mask"])[np.ix_(ys, xs)] > 127))
    return ConceptTokens(
        [torch.stack(v) for v in vectors],
        keys,
        family,
        [c["name"] for c in manifest["concepts"]],
        torch.stack(masks),
        torch.from_numpy(image.copy()),
        manifest.get("history", {}),
        {**manifest.get("info", {}), "source": manifest.get("source", {})},
    )
