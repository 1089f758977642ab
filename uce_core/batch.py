"""Many images into one concept library (library.py): the work of one image, and the driver that plans, hands the
images to an engine and writes what comes back.

The engine runs ``run_task`` somewhere: ``LocalEngine`` in this process, one image after another (the default,
nothing to install), or ``ray_engine.RayEngine`` on a Ray instance or cluster. Either way the driver reads each image
file and sends its bytes (workers need no access to the driver's files), the worker sends back the finished files of
the set (made by the same export code as ``extract``), and only the driver writes into the library. So a run on Ray and
a run here write the same files; the tokens are bit-identical for the same seed and the same number of torch threads
per image (``threads``; CPU matrix products sum in an order that depends on it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConceptExpressError
from .library import Entry, Library, list_images

SAMPLES = "samples"  # LIBRARY/<image>/samples/<concept name>.png with --preview
TEST_CRASH_ENV = "CONCEPT_EXPRESS_TEST_CRASH"  # a test hook, see _test_crash_hook


@dataclass(frozen=True)
class ExtractJob:
    """What every image of a library is extracted with. ``identity()`` is recorded in the index: a library is
    continued only with the same one (device and thread count may change; they do not change what is learned, up to
    float rounding)."""

    model: str
    dtype: str = "auto"  # a precision policy of backends.diffusers_backend.PRECISIONS
    prediction_type: str | None = None
    tokenizer: str | None = None
    config: str | None = None
    capture: dict = field(default_factory=dict)  # capture_attention keywords (timestep, prompt, resize, resolution)
    localize: dict = field(default_factory=dict)  # LocalizeSettings fields
    train: dict = field(default_factory=dict)  # TrainSettings fields
    prefix: str = "concept"
    preview: dict | None = None  # {"steps": ..., "prompt": ...}: one rendered sample per concept
    device: str | None = None

    def identity(self) -> dict:
        fields = dataclasses.asdict(self)
        for name in ("preview", "device"):
            fields.pop(name)
        for name in ("checkpoint_every", "micro_batch", "gradient_checkpointing"):  # change speed, not results
            fields["train"].pop(name, None)
        return json.loads(json.dumps(fields))  # as the index stores it (tuples become lists)

    def load_backend(self):
        from .backends.loading import load_backend

        return load_backend(
            self.model,
            device=self.device,
            dtype=self.dtype,
            prediction_type=self.prediction_type,
            tokenizer=self.tokenizer,
            config=self.config,
        )


@dataclass
class ImageResult:
    """What one image's work returns: ``status`` done / failed / crashed, the set's files (done) and the index data."""

    status: str
    files: dict[str, bytes] = field(default_factory=dict)
    data: dict = field(default_factory=dict)


# -- one image ---------------------------------------------------------------------------------------------------------
def extract_image(backend, job: ExtractJob, image: bytes, image_path: str, progress=None) -> ImageResult:
    """Capture, localize, train and export one image; the files as ``extract`` writes them (plus samples with a
    preview). Raises ``ConceptExpressError`` for the image's own problems."""
    from .attention import capture_attention
    from .export import export_tokens
    from .localize import LocalizeSettings, localize_concepts
    from .previews import attention_rows_preview, eot_preview
    from .train import TrainSettings, train_concept_tokens

    started = time.perf_counter()
    maps = capture_attention(backend, _open_image(image, image_path), **job.capture)
    concepts = localize_concepts(maps, LocalizeSettings(**job.localize))
    train = dict(job.train)
    if "adam_betas" in train:
        train["adam_betas"] = tuple(train["adam_betas"])
    tokens = train_concept_tokens(backend, concepts, TrainSettings(**train), progress=progress)
    with tempfile.TemporaryDirectory(prefix="concept-express-") as tmp:
        folder = Path(tmp)
        result = export_tokens(tokens, folder, prefix=job.prefix, extra={"image": image_path, "model": job.model})
        for name, preview in (("attention_rows.png", attention_rows_preview), ("eot.png", eot_preview)):
            preview(maps).save(folder / name, format="PNG")
        if job.preview:
            _render_samples(backend, tokens, result.names, folder / SAMPLES, job.preview)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    areas = concepts.masks.flatten(1).float().mean(1).tolist()
    history = tokens.history.get("loss") or [float("nan")]
    data = {
        "model": job.model,
        "family": tokens.family,
        "grid": list(concepts.grid),
        "concepts": [
            {"name": n, "file": e.name, "mask": f"{n}_mask.png", "area": round(a, 6), "eot_score": round(float(s), 6)}
            for n, e, a, s in zip(result.names, result.embeddings, areas, concepts.scores.tolist())
        ],
        "final_loss": history[-1],
        "steps": len(tokens.history.get("loss", [])),
        "seconds": round(time.perf_counter() - started, 3),
        "error": None,
    }
    return ImageResult("done", files, data)


def _open_image(image: bytes, path: str):
    """The image decoded, or the loader's error naming the file (not the in-memory stream it was read from)."""
    from .images import load_image

    try:
        return load_image(image)
    except ConceptExpressError as err:
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).removeprefix("image")
        raise ConceptExpressError(f"{Path(path).name}{message}") from None


def _render_samples(backend, tokens, names, folder: Path, preview: dict) -> None:
    from .generate import generate_images

    folder.mkdir()
    for i, name in enumerate(names):
        prompt = preview.get("prompt", "a photo of {}").replace("{}", f"{{{i + 1}}}")
        picture = generate_images(backend, tokens, prompt, seed=0, count=1, steps=preview.get("steps", 25))[0]
        picture.save(folder / f"{name}.png", format="PNG")


def run_task(backend, job: ExtractJob, image: bytes | None, entry: Entry, progress=None) -> ImageResult:
    """``extract_image`` with every outcome turned into a result: the image's own problems are ``failed`` (kept as
    they are by the next run), anything else ``crashed`` (done again by the next run). Interrupts propagate."""
    started = time.perf_counter()

    def report(step, total, losses):
        _test_crash_hook(entry.folder, step)
        if progress is not None:
            progress(entry, step, total, losses)

    try:
        if image is None:
            raise ConceptExpressError(f"{entry.image}: no such file.")
        return extract_image(backend, job, image, entry.image, report)
    except ConceptExpressError as err:
        return ImageResult("failed", data=_error(job, err, started))
    except Exception as err:  # a bug or a resource problem: recorded, and the other images go on
        return ImageResult("crashed", data=_error(job, err, started, crash=True))


def _error(job, err, started, crash=False) -> dict:
    message = f"{type(err).__name__}: {err}" if crash else str(err)
    return {"model": job.model, "error": message, "seconds": round(time.perf_counter() - started, 3)}


def _test_crash_hook(folder: str, step: int) -> None:
    """Test hook: with ``CONCEPT_EXPRESS_TEST_CRASH=ACTION:FOLDER:STEP:MARKER`` the process running image FOLDER,
    when its training reaches STEP, dies at once (ACTION ``kill``: as a killed worker does) or gets SIGINT (``int``:
    as from Ctrl-C). Once: MARKER is created first, and an existing MARKER disarms the hook, so a retry runs through."""
    spec = os.environ.get(TEST_CRASH_ENV)
    if not spec:
        return
    action, name, at, marker = spec.split(":", 3)
    if name == folder and step == int(at) and not os.path.exists(marker):
        Path(marker).write_text(f"{os.getpid()}\n")
        if action == "int":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            os._exit(17)


def read_image(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


# -- engines and the driver -------------------------------------------------------------------------------------------
class LocalEngine:
    """This process, one image after another; the model is loaded once by ``start``."""

    name = "local"

    def __init__(self, threads: int | None = None):
        self.threads, self.backend = threads, None

    def start(self, job: ExtractJob, display) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self.backend = job.load_backend()
        display.say(f"model: {self.backend.info.name} ({self.backend.info.family}) on {self.backend.device}, local")

    def run(self, job: ExtractJob, entries: list[Entry], deliver: Callable, display) -> None:
        for entry in entries:
            display.started(entry)
            deliver(entry, run_task(self.backend, job, read_image(entry.image), entry, display.training))

    def stop(self) -> None:
        self.backend = None


@dataclass
class RunReport:
    library: Path
    done: int = 0
    failed: int = 0
    crashed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    driver_seconds: float = 0.0  # spent writing results and the index (the driver's overhead)
    errors: list[tuple[str, str]] = field(default_factory=list)


def extract_many(
    source: str | os.PathLike | list,
    library: str | os.PathLike,
    job: ExtractJob,
    *,
    engine=None,
    retry_failed: bool = False,
    gallery: bool = True,
    display=None,
) -> RunReport:
    """Extract every image of ``source`` (a folder, a text file of paths, or a list of paths) into ``library``.

    Everything that can be checked is checked before anything is written: the images, the output folder, the
    library's settings, the engine (a Ray cluster is connected, a local model loaded). Then the index is written with
    every image to do as ``pending``, and rewritten as each result arrives. Finished images of an earlier run are
    skipped. An interrupt (Ctrl-C) keeps what was finished; the next run does the rest."""
    display = display or Display()
    images = [Path(p).resolve() for p in source] if isinstance(source, list) else list_images(source)
    lib = Library.open(library, job.identity())
    needs = _needs(job)
    todo = lib.plan(images, retry_failed, needs)
    report = RunReport(lib.root, skipped=len(images) - len(todo))
    if not todo:
        display.say(f"nothing to do: all {len(images)} image(s) of {lib.root} are finished")
        if gallery and not (lib.root / "index.html").exists():
            _gallery(lib)
        return report
    engine = engine or LocalEngine()
    started = time.perf_counter()
    engine.start(job, display)  # may raise (Ray unreachable, model not loadable): nothing is written yet
    try:
        lib.save()
        display.begin(len(todo), report.skipped)

        def deliver(entry: Entry, result: ImageResult) -> None:
            tick = time.perf_counter()
            data = dict(result.data)
            data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if result.status == "done":
                lib.place(entry, result.files)
            lib.record(entry, result.status, data)
            setattr(report, result.status, getattr(report, result.status) + 1)
            if result.status != "done":
                report.errors.append((entry.image, data.get("error") or ""))
            report.driver_seconds += time.perf_counter() - tick
            display.finished(entry, result.status, data)

        engine.run(job, todo, deliver, display)
    finally:
        engine.stop()
        display.close()
        if lib.exists:
            lib.clean_staging()
            if gallery:
                _gallery(lib)
    report.seconds = time.perf_counter() - started
    return report


def _needs(job: ExtractJob) -> Callable[[dict], list[str]]:
    """Files a done set must have beyond the manifest's: the previews, and the samples when asked for."""
    fixed = ["image.png", "concepts.png", "loss.png", "attention_rows.png", "eot.png"]

    def needs(manifest: dict) -> list[str]:
        names = [c.get("name") for c in manifest.get("concepts", [])]
        return fixed + ([f"{SAMPLES}/{n}.png" for n in names] if job.preview else [])

    return needs


def _gallery(lib: Library) -> None:
    from .gallery import write_gallery

    write_gallery(lib.root)


# -- what the user sees -------------------------------------------------------------------------------------------------
class Display:
    """Progress on stderr: a bar over the images and the current image's training, redrawn on a terminal; on a log,
    a line per finished image. Silent with ``quiet``."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet, self.tty = quiet, self.stream.isatty()
        self.total = self.count = 0
        self.running: dict[str, str] = {}
        self.started_at = time.perf_counter()

    def say(self, message: str) -> None:
        if not self.quiet:
            self._clear()
            print(message, file=self.stream, flush=True)

    def begin(self, total: int, skipped: int) -> None:
        self.total, self.started_at = total, time.perf_counter()
        self.say(f"{total} image(s) to do" + (f", {skipped} already finished" if skipped else ""))

    def started(self, entry: Entry) -> None:
        self.running[entry.folder] = "starting"
        self._draw()

    def training(self, entry: Entry, step: int, total: int, losses: dict) -> None:
        if "resumed" in losses:
            return
        self.running[entry.folder] = f"train {step}/{total} loss {losses.get('loss', float('nan')):.4f}"
        self._draw()

    def finished(self, entry: Entry, status: str, data: dict) -> None:
        self.count += 1
        self.running.pop(entry.folder, None)
        if status == "done":
            what = f"{len(data.get('concepts', []))} concept(s), final loss {data.get('final_loss', float('nan')):.4f}"
        else:
            what = f"{status.upper()}: {data.get('error')}"
        self.say(f"[{self.count}/{self.total}] {Path(entry.image).name} -> {entry.folder}/: {what}")
        self._draw()

    def _draw(self) -> None:
        if self.quiet or not self.tty or not self.total:
            return
        filled = int(24 * self.count / self.total)
        current = "; ".join(f"{k}: {v}" for k, v in list(self.running.items())[:3])
        line = f"[{'#' * filled}{'.' * (24 - filled)}] {self.count}/{self.total} images"
        line += f" {time.perf_counter() - self.started_at:.0f}s" + (f" | {current}" if current else "")
        print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self.total:
            print("\r" + " " * 160 + "\r", end="", file=self.stream, flush=True)

    def close(self) -> None:
        self._clear()
