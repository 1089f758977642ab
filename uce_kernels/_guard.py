"""The guarded Triton path: in backend="auto" a Triton kernel is trusted on a device only once it has proved itself.

A user's torch, Triton and GPU may be combinations this project never ran (another Triton version, a Windows build, a
GPU from Turing to Blackwell). So the first time backend="auto" would run a Triton kernel on a device, the kernel
solves a small problem with clear answers and is compared with the torch path (``run_guarded``'s ``self_check``). A
compile error, a launch error or a disagreement there, or an error in any later auto-mode launch, makes that device
use the torch path for the rest of the process, with one warning that names the error and how to report it.
Out-of-memory errors are not the kernel's fault: they propagate (the torch path would need the memory too).
backend="triton" bypasses all of this and raises, for benchmarks and tests.
"""

import threading
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

ISSUES_URL = "https://github.com/concept-express/comfyui-concept-express/issues"
_MESSAGE_CHARS = 600  # a Triton compile error can run to pages; the warning keeps its start

T = TypeVar("T")
_lock = threading.Lock()
_trusted: set[tuple] = set()  # (kernel, variant, device key): passed the self-check
_refused: dict[tuple, str] = {}  # device key -> the warning given when it was refused
_checks: list[dict] = []  # one record per self-check run: what, where, how long, the outcome


class SelfCheckFailed(RuntimeError):
    """A Triton kernel ran but disagreed with the torch path on the self-check problem."""


def device_key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    return device.type, device.index


def run_guarded(
    kernel: str, variant: str, device: torch.device, self_check: Callable[[], None], call: Callable[[], T]
) -> T | None:
    """``call()`` (a Triton launch) if Triton is trusted on ``device``, else None: the caller then runs the torch path.

    The first time (kernel, variant) meets a device, ``self_check()`` runs first; it raises on a compile or launch
    error or a disagreement. ``variant`` names a separately compiled form (e.g. precision and self/queries).
    """
    key = device_key(device)
    if key in _refused:
        return None
    if (kernel, variant, key) not in _trusted:
        with _lock:
            if key in _refused:
                return None
            if (kernel, variant, key) not in _trusted:
                if not _checked(kernel, variant, device, key, self_check):
                    return None
                _trusted.add((kernel, variant, key))
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        _refuse(key, device, kernel, variant, "failed", error, stacklevel=4)
        return None


def _checked(kernel, variant, device, key, self_check) -> bool:
    start = time.perf_counter()
    record = {"kernel": kernel, "variant": variant, "device": str(device), "ok": False, "error": None}
    try:
        self_check()
        record["ok"] = True
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"[:_MESSAGE_CHARS]
        _refuse(key, device, kernel, variant, "failed its self-check", error, stacklevel=5)
    finally:
        record["seconds"] = time.perf_counter() - start
        _checks.append(record)
    return record["ok"]


def _refuse(key, device, kernel: str, variant: str, what: str, error: Exception, stacklevel: int) -> None:
    detail = f"{type(error).__name__}: {error}".strip()
    if len(detail) > _MESSAGE_CHARS:
        detail = detail[:_MESSAGE_CHARS] + " [...]"
    message = (
        f"concept_express: the Triton kernel {kernel} ({variant}) {what} on {_describe(device)}: {detail}\n"
        f"This device now uses the exact torch path for the rest of the process (same results, slower). Please "
        f"report this at {ISSUES_URL} with this message; calling the op with backend='triton' raises the full error."
    )
    _refused[key] = message
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)  # points at the op's caller


def _describe(device: torch.device) -> str:
    parts = []
    try:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            parts.append(f"{torch.cuda.get_device_name(index)}, sm_{major}{minor}")
    except Exception:  # describing the device must never be what fails
        pass
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:
        parts.append("triton not importable")
    return f"{device} ({', '.join(parts)})"


def refused(device: torch.device) -> str | None:
    """The warning given when Triton was refused on ``device``, or None while it is not refused."""
    return _refused.get(device_key(device))


def checks() -> list[dict]:
    """The self-checks run in this process (kernel, variant, device, seconds, ok, error): for benchmarks."""
    return [dict(r) for r in _checks]


def reset() -> None:
    """Forget every verdict (tests and benchmarks: the next auto-mode call checks again)."""
    with _lock:
        _trusted.clear()
        _refused.clear()
        _checks.clear()
