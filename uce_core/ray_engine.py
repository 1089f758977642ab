"""The Ray engine of ``extract_many`` (an optional extra: ``pip install -e ".[ray]"``).

One Ray task per image. A task asks for ``gpus_per_task`` GPUs (default: 1 when the cluster has GPUs, else 0) and
``cpus_per_task`` CPUs, so Ray runs one image per GPU (or per ``cpus_per_task`` cores) at a time. The model is loaded
once per worker process and kept there (``max_calls=0``: Ray would otherwise start a fresh process for every GPU
task). A task whose worker process dies (killed, out of memory, its node lost) is retried by Ray up to
``max_retries`` times, on any node; results a lost node held are recomputed. The driver sends each image's bytes with
its task and writes every result itself, so the index has one writer and workers need no access to the driver's
files, only the package and the model (at the same path on every node, or a ``tiny-*`` name).

``address=None`` starts a local Ray instance for this run only (on the loopback interface, ``workers`` task slots),
stopped at the end; an address joins an existing cluster (``ray start --head`` on one machine, ``ray start
--address HEAD:6379`` on the others) and leaves it running.
"""

from __future__ import annotations

import os
import socket
import time

from .batch import ExtractJob, read_image, run_task
from .errors import ConceptExpressError

_BACKENDS: dict[str, object] = {}  # per worker process: the model, loaded by the first task that needs it


def _import_ray(local: bool):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage anywhere
    if local:  # a single-machine instance binds to 127.0.0.1 (Ray's own switch for single-machine clusters)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConceptExpressError(
            'Ray is not installed: install the optional extra with pip install -e ".[ray]" '
            "(or pip install ray), or run without --ray / --ray-address."
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One clear error, at once, when nothing listens at ``address`` (HOST:PORT); Ray itself would wait forever."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ConceptExpressError(
            f"cannot reach a Ray cluster at {address} ({getattr(err, 'strerror', None) or err}); nothing was written. "
            "Start one there with 'ray start --head', check the address (HOST:PORT, default port 6379), "
            "or use --ray for a local instance."
        ) from None


class RayEngine:
    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_task: float = 1,
        gpus_per_task: float | None = None,
        threads: int | None = None,
        max_retries: int = 3,
        object_store_mb: int = 256,
    ):
        self.address, self.workers, self.cpus, self.gpus = address, workers, cpus_per_task, gpus_per_task
        self.threads = threads or max(1, int(cpus_per_task))
        self.max_retries, self.object_store_mb = max_retries, object_store_mb
        self.ray = self.progress = self.remote = None
        self.started_here = False

    def start(self, job: ExtractJob, display) -> None:
        import logging

        ray = self.ray = _import_ray(local=self.address is None)
        if self.address:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError here
                raise ConceptExpressError(f"cannot join the Ray cluster at {self.address}: {err}") from None
        else:
            workers = self.workers or os.cpu_count() or 1
            for attempt in range(3):  # Ray gives its raylet a fixed 30 s to start: a busy machine may need longer
                try:
                    ray.init(
                        num_cpus=int(workers * self.cpus),
                        include_dashboard=False,
                        object_store_memory=self.object_store_mb * 2**20,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                    break
                except Exception as err:
                    ray.shutdown()
                    if attempt == 2:
                        raise ConceptExpressError(
                            f"the local Ray instance did not start ({str(err).splitlines()[0]}); nothing was written. "
                            "Try again when the machine is less busy, or run without --ray."
                        ) from None
            self.started_here = True
        resources = ray.cluster_resources()
        gpus = self.gpus if self.gpus is not None else (1 if resources.get("GPU", 0) > 0 else 0)
        self.slots = max(1, int(resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 1) // self.cpus))
        self.remote = ray.remote(
            num_cpus=self.cpus, num_gpus=gpus, max_retries=self.max_retries, retry_exceptions=False, max_calls=0
        )(_ray_task)
        self.progress = ray.remote(num_cpus=0)(_Progress).remote()
        where = "a local Ray instance" if self.started_here else f"the Ray cluster at {self.address}"
        display.say(
            f"model: {job.model} on {where}: {self.slots} task slot(s), {gpus:g} GPU and {self.cpus:g} CPU per image, "
            f"{self.threads} torch thread(s) per image, up to {self.max_retries} retries"
        )

    def run(self, job: ExtractJob, entries, deliver, display) -> None:
        ray, waiting, pending = self.ray, list(entries), {}
        try:
            while waiting or pending:
                while waiting and len(pending) < 2 * self.slots:  # a bounded window: image bytes wait in the driver
                    entry = waiting.pop(0)
                    ref = self.remote.remote(job, read_image(entry.image), entry, self.progress, self.threads)
                    pending[ref] = entry
                    display.started(entry)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for folder, (step, total, loss) in ray.get(self.progress.take.remote()).items():
                    entry = next((e for e in pending.values() if e.folder == folder), None)
                    if entry is not None:
                        display.training(entry, step, total, {"loss": loss})
                for ref in ready:
                    entry = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:  # the task's worker died more often than the retries allow
                        from .batch import ImageResult

                        first = str(err).splitlines()[0] if str(err) else ""
                        message = f"{type(err).__name__}: {first} (tried {self.max_retries + 1} time(s))"
                        result = ImageResult("crashed", data={"model": job.model, "error": message})
                    if result.status == "fatal":
                        raise ConceptExpressError(result.data["error"])
                    deliver(entry, result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def stop(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()


def _ray_task(job: ExtractJob, image, entry, progress, threads: int):
    """Runs in a Ray worker: the cached model, then the image (batch.run_task)."""
    import torch

    torch.set_num_threads(threads)
    key = repr(job.identity()) + repr(job.device)
    if key not in _BACKENDS:
        _BACKENDS.clear()
        try:
            _BACKENDS[key] = job.load_backend()
        except ConceptExpressError as err:  # the same for every image: the driver stops the run
            from .batch import ImageResult

            return ImageResult(
                "fatal", data={"error": f"a worker on {socket.gethostname()} cannot load the model: {err}"}
            )
    last = [0.0]

    def report(entry, step, total, losses):
        now = time.monotonic()
        if now - last[0] > 0.5 or step == total:
            last[0] = now
            progress.put.remote(entry.folder, step, total, float(losses.get("loss", float("nan"))))

    return run_task(_BACKENDS[key], job, image, entry, report)


class _Progress:
    """A Ray actor holding the latest training step each running image reported; the driver takes them."""

    def __init__(self):
        self.latest = {}

    def put(self, folder, step, total, loss):
        self.latest[folder] = (step, total, loss)

    def take(self):
        latest, self.latest = self.latest, {}
        return latest
