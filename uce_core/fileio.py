"""Files the project writes and reads: always atomically (temp file in the same folder, then rename), tensors
always as safetensors with a JSON metadata header, so nothing half-written is ever left and nothing loaded can
execute code."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ConceptExpressError

_META_KEY = "concept_express"


def _exists(path: Path) -> str:
    return f"{path} already exists; choose another name or allow overwriting (--overwrite; the node's overwrite input)."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    With ``overwrite=False`` an existing ``path`` raises ``ConceptExpressError`` before anything is written
    (and the final rename refuses to replace a file that appeared meanwhile).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise ConceptExpressError(_exists(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode an ordinary open() would
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_without_replacing(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _place_without_replacing(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path`` unless ``path`` exists, also when another writer races us."""
    try:
        os.link(tmp, path)  # fails if path exists: no silent replacement
    except FileExistsError:
        raise ConceptExpressError(_exists(path)) from None
    except OSError:  # no hard links here (FAT, exFAT, some network shares): claim the name exclusively instead
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise ConceptExpressError(_exists(path)) from None
        try:
            os.replace(tmp, path)  # replaces only the empty placeholder we just created
        except BaseException:
            os.unlink(path)
            raise
        return
    os.unlink(tmp)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None], overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None, overwrite: bool = True
) -> Path:
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {_META_KEY: json.dumps(meta or {})}
    return write_atomic(path, lambda tmp: save_file(clean, str(tmp), metadata=header), overwrite)


def load_tensors(path: str | os.PathLike, expected_format: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptExpressError(f"{path}: no such file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise ConceptExpressError(f"{path}: not a readable safetensors file ({err}).") from None
    if expected_format is not None and meta.get("format") != expected_format:
        raise ConceptExpressError(
            f"{path}: expected a {expected_format} file, found {meta.get('format') or 'something else'}."
        )
    return tensors, meta
