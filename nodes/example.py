"""The pack's example image in ComfyUI's input folder, so that Load Image in the templates can show it.

It is copied under a name of its own (``EXAMPLE_IMAGE_NAME``) when ComfyUI loads the pack, and only when no file of
that name is there: a file the user has is never replaced or changed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

EXAMPLE_IMAGE_NAME = "concept-express-example.png"
SOURCE = Path(__file__).resolve().parent.parent / "assets" / "example.png"


def install_example_image(input_dir: str | os.PathLike | None = None) -> Path | None:
    """Copy the example into ``input_dir`` (default: the running ComfyUI's input folder) unless a file of that name
    exists. Returns the file's path, or None outside ComfyUI (no input folder given and ComfyUI's ``folder_paths``
    not loaded) or when the folder cannot be written (the pack still loads; the template then shows a missing
    image)."""
    if input_dir is None:
        folder_paths = sys.modules.get("folder_paths")  # only present inside a ComfyUI process; never imported here
        if folder_paths is None:
            return None
        input_dir = folder_paths.get_input_directory()
    target = Path(input_dir) / EXAMPLE_IMAGE_NAME
    if target.exists():
        return target
    temporary = target.with_name(f".{EXAMPLE_IMAGE_NAME}.{uuid.uuid4().hex}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(SOURCE.read_bytes())
        try:
            os.link(temporary, target)  # fails if the name appeared meanwhile: a file the user has stays as it is
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive creation, also never replacing a file
            with open(target, "xb") as file:
                file.write(temporary.read_bytes())
    except FileExistsError:
        pass
    except OSError as error:
        print(f"[ConceptExpress] could not copy the example image to {target}: {error}", file=sys.stderr)
        return None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return target
