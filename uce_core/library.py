"""A concept library on disk: one concept set per image, and ``index.json``, the record of the whole job.

Layout::

    LIBRARY/index.json          the job (model and settings) and one entry per image, rewritten atomically
    LIBRARY/index.html          the gallery (gallery.py)
    LIBRARY/<image-stem>/       the image's concept set, exactly as ``concept-express extract`` writes it
    LIBRARY/<image-stem>-2/     a second image whose stem is the same (another folder, same file stem)

An entry's ``status`` is ``pending`` (planned or interrupted: done on the next run), ``done``, ``failed`` (the image's
own problem: unreadable, no concept found, training diverged; kept as it is unless the run asks to retry failures) or
``crashed`` (the work was lost: a worker died more often than the retries allow, or an unexpected error; done again on
the next run). A ``done`` entry whose folder was deleted or damaged counts as not done.

Only the process that runs the job (the driver) writes here. A finished set is written into a hidden staging folder
and renamed into place, so a folder named in the index is complete or absent, never half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConceptExpressError
from .export import read_manifest, sanitize_name

INDEX = "index.json"
INDEX_FORMAT = "concept-express/library/1"
STAGING = ".staging"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# In a folder of images with ground-truth masks (evaluate --truth), NAME_mask_K.png beside NAME.<ext> is a mask.
MASK_NAME = re.compile(r"^(?P<stem>.+)_mask_(?P<k>\d+)\.png$", re.IGNORECASE)
FINISHED = ("done", "failed")


def list_images(source: str | os.PathLike) -> list[Path]:
    """The images of a folder (sorted, not recursive; ground-truth masks ``NAME_mask_K.png`` beside an image NAME are
    not images), or of a text file with one path per line (relative to the file's folder; blank lines and # comments
    are skipped). Absolute paths. One clear error when there is nothing to do."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ConceptExpressError(f"{source} is an empty folder; give a folder of images or a list of image paths.")
        stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not _is_mask(p, stems)]
        if not images:
            raise ConceptExpressError(
                f"{source} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)}); "
                "give a folder of images or a text file listing image paths."
            )
        return [p.resolve() for p in images]
    if source.is_file():
        if source.suffix.lower() in IMAGE_SUFFIXES:
            raise ConceptExpressError(
                f"{source} is an image; extract-many takes a folder of images or a text file listing image paths "
                "(use 'extract' for one image)."
            )
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConceptExpressError(f"{source}: cannot be read as a list of image paths ({err}).") from None
        paths = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not paths:
            raise ConceptExpressError(f"{source} lists no image paths; write one path per line.")
        images = [(source.parent / p).resolve() for p in paths]
        return list(dict.fromkeys(images))  # a path listed twice is one image
    raise ConceptExpressError(f"{source}: no such folder or file; give a folder of images or a list of image paths.")


def _is_mask(path: Path, stems: set[str]) -> bool:
    match = MASK_NAME.match(path.name)
    return bool(match) and match.group("stem") in stems


@dataclass
class Entry:
    """One image of the library (the index holds these as JSON objects)."""

    image: str
    folder: str
    status: str = "pending"
    data: dict | None = None  # everything else the index records (concepts, loss, time, error, evaluation)

    def to_json(self) -> dict:
        return {"image": self.image, "folder": self.folder, "status": self.status, **(self.data or {})}

    @classmethod
    def from_json(cls, value: dict) -> Entry:
        rest = {k: v for k, v in value.items() if k not in ("image", "folder", "status")}
        return cls(str(value["image"]), str(value["folder"]), str(value["status"]), rest)


class Library:
    """The library folder and its index. ``open`` checks everything and writes nothing; ``save`` writes the index."""

    def __init__(self, root: Path, job: dict, entries: list[Entry], exists: bool, meta: dict | None = None):
        self.root, self.job, self.entries, self.exists = root, job, entries, exists
        self.meta = meta or {}  # other top-level records (the evaluation's means)

    @classmethod
    def open(cls, root: str | os.PathLike, job: dict | None) -> Library:
        """The library at ``root`` for ``job`` (a JSON-able description of the model and settings; None: whatever the
        library was made with). Raises if ``root`` is a file, holds an index.json that is not a library's, or was
        made with another job."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ConceptExpressError(f"{root} is a file, not a folder; give --out a folder for the library.")
        index = root / INDEX
        if not index.exists():
            if job is None:
                raise ConceptExpressError(f"{root} is not a concept library (no {INDEX}); run extract-many first.")
            return cls(root, job, [], exists=False)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            if data.get("format") != INDEX_FORMAT:
                raise ValueError("not a library index")
            entries = [Entry.from_json(e) for e in data["images"]]
            recorded = data["job"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConceptExpressError(
                f"{index} is not a concept library's index ({type(err).__name__}: {err}); nothing was changed. "
                "Give --out a new folder or the folder of an earlier extract-many."
            ) from None
        if job is not None and recorded != job:
            differ = sorted(k for k in set(recorded) | set(job) if recorded.get(k) != job.get(k))
            raise ConceptExpressError(
                f"{root} was made with other settings ({', '.join(differ)} differ); nothing was changed. Continue it "
                "with the options it was made with (see job in its index.json), or give --out another folder."
            )
        meta = {k: v for k, v in data.items() if k not in ("format", "job", "updated", "images")}
        return cls(root, recorded, entries, exists=True, meta=meta)

    # -- planning ---------------------------------------------------------------------------------------------------
    def entry_for(self, image: Path) -> Entry | None:
        key = str(image)
        return next((e for e in self.entries if e.image == key), None)

    def plan(self, images: list[Path], retry_failed: bool = False, needs=None) -> list[Entry]:
        """The entries of ``images`` that need work, in input order, adding entries (with unique folder names) for
        images the library has not seen. Finished entries are kept unless their files are gone (or, with
        ``retry_failed``, they failed). ``needs(manifest)``: more files (relative to the image's folder) a done set
        must have."""
        todo = []
        for image in images:
            entry = self.entry_for(image)
            if entry is None:
                entry = Entry(str(image), self._free_folder(image))
                self.entries.append(entry)
            else:
                finished = entry.status == "done" and self.is_complete(entry, needs)
                if finished or (entry.status == "failed" and not retry_failed):
                    continue
            todo.append(entry)
        return todo

    def is_complete(self, entry: Entry, needs=None) -> bool:
        """Whether a done entry's folder still holds its whole set (manifest, every embedding and mask it names)."""
        folder = self.root / entry.folder
        manifest = read_manifest(folder)
        if manifest is None:
            return False
        files = [f for c in manifest.get("concepts", []) for f in (c.get("file"), c.get("mask"))]
        files += needs(manifest) if needs else []
        return all(isinstance(f, str) and (folder / f).is_file() for f in files)

    def _free_folder(self, image: Path) -> str:
        try:
            stem = sanitize_name(image.stem, "image name")
        except ConceptExpressError:
            stem = "image"
        taken = {e.folder.lower() for e in self.entries}
        name, k = stem, 1
        while name.lower() in taken or name.lower() in (INDEX.lower(), "index.html", STAGING) or self._foreign(name):
            k += 1
            name = f"{stem}-{k}"
        return name

    def _foreign(self, name: str) -> bool:
        """A folder or file of that name is already here and the index does not own it (never written over)."""
        return (self.root / name).exists()

    # -- writing ----------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        from .fileio import write_text_atomic

        self.root.mkdir(parents=True, exist_ok=True)
        data = {
            "format": INDEX_FORMAT,
            "job": self.job,
            **self.meta,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "images": [e.to_json() for e in self.entries],
        }
        self.exists = True
        return write_text_atomic(self.root / INDEX, json.dumps(data, indent=2, default=str))

    def place(self, entry: Entry, files: dict[str, bytes]) -> Path:
        """Write a finished set (relative name -> content) into ``entry``'s folder: into a staging folder first, then
        renamed into place, replacing what an earlier, unfinished attempt left there."""
        staging = self.root / STAGING / entry.folder
        if staging.exists():
            shutil.rmtree(staging)
        for name, content in files.items():
            path = staging / name
            if path.resolve().parent != staging.resolve() and staging.resolve() not in path.resolve().parents:
                raise ValueError(f"{name!r} leaves the image's folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        target = self.root / entry.folder
        if target.exists():  # an earlier attempt of this entry (the index owns the folder): replaced whole
            old = self.root / STAGING / f"{entry.folder}.old"
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
        return target

    def record(self, entry: Entry, status: str, data: dict) -> None:
        entry.status, entry.data = status, data
        self.save()

    def clean_staging(self) -> None:
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
