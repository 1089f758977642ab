"""How many prompts of a training step go through the UNet at once (the micro-batch), chosen before the first step
from the memory the device has and what one prompt costs at this latent size.

The rule (``plan_micro_batch``):

* budget: ``SAFETY`` x the memory available now (CUDA: the device's free memory plus what torch's cache holds
  unused; MPS: the recommended working-set limit minus what the driver has allocated; CPU: the system's available
  memory (Linux ``MemAvailable``), or the cgroup's limit minus its usage when that is smaller), or the budget the
  caller gives (``TrainSettings.memory_budget``);
* cost: one forward of the training computation (text encoder, UNet, losses) with 1 and with 2 prompts, counting
  the bytes autograd saves for the backward pass (``saved_bytes``; the models' own weights, already in memory, are
  not counted). Per prompt: d = saved(2) - saved(1); fixed: saved(1) - d (what does not grow with the batch, e.g.
  autocast's half-precision copies of the weights). A step at
  micro-batch m is estimated at fixed + ``BACKWARD_FACTOR`` x m x d: the backward pass holds, besides the saved
  tensors, the gradients of the activations it is working through, the losses' own work (the EMD's Sinkhorn
  iterations) and what the allocator keeps (measured: 3.3 x d for the SD1.5 architecture at full size on the CPU,
  tests/test_memory.py's real-size run; about 1 on tiny models: benchmarks/README.md "Training memory"). On a Linux
  CPU, where overcommitting means the kernel kills the process (a ComfyUI server with it), the planner also runs a
  forward and backward pass on 1 and on 2 prompts and measures the resident-set peak each adds; per prompt and fixed
  are then at least what was measured. (Not enough for everything: an SDXL extract inside a ComfyUI server grew the
  process by about 12 GB where about 8 GB were estimated; docs/comfyui-tests.md, a known problem);
* micro-batch: the largest m <= the prompts of a step whose estimate fits the budget, at least 1.

Where the device reports running out (CUDA, MPS, a CPU allocation that fails) the step is retried at half the
micro-batch (train.py). On the CPU the usual outcome of overcommitting is the kernel killing the process, which is
why the choice is made before the first step.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30
SAFETY = 0.8  # of the available memory: other processes, the allocator's fragmentation, the estimate's error
BACKWARD_FACTOR = 3.5  # peak memory of a step per prompt / bytes saved for backward per prompt (measured 3.3)


@dataclass(frozen=True)
class MicroBatchPlan:
    micro_batch: int
    prompts: int  # prompts of the largest step
    per_prompt: int  # estimated bytes per prompt (BACKWARD_FACTOR x saved)
    fixed: int  # estimated bytes that do not grow with the micro-batch
    budget: int | None  # bytes; None when the available memory could not be read
    source: str  # where the budget came from

    def estimate(self, micro_batch: int) -> int:
        return self.fixed + micro_batch * self.per_prompt

    def describe(self) -> str:
        text = (
            f"{self.micro_batch} of {self.prompts} prompts per UNet call "
            f"(about {self.per_prompt / GiB:.2f} GiB per prompt at this size"
        )
        if self.budget is None:
            return text + f"; {self.source}: one at a time)"
        text += f", budget {self.budget / GiB:.1f} GiB: {self.source})"
        if self.estimate(1) > self.budget:
            text += "; even one prompt may not fit"
        return text


def plan_micro_batch(
    device: torch.device,
    prompts: int,
    forward: Callable[[int], object],
    *,
    budget_gib: float = 0.0,
    available: tuple[int | None, str] | None = None,
    resident: set[tuple[str, int]] = frozenset(),
    step: Callable[[int], None] | None = None,
) -> MicroBatchPlan:
    """The micro-batch for steps of up to ``prompts`` prompts; ``forward(m)`` runs the training forward on m prompts
    (its saved tensors are counted, except the ``resident`` ones (the models' weights), its result dropped). On a
    Linux CPU, ``step(m)`` (forward and backward on m prompts) is also run for m = 1 and 2 and the process's resident
    peak measured (``resident_peaks``); the estimate takes the larger of the two. See the module docstring."""
    if budget_gib > 0:
        budget, source = int(budget_gib * GiB), "the memory budget given"
    else:
        free, source = available if available is not None else available_memory(device)
        budget = int(free * SAFETY) if free is not None else None
        if free is not None:
            source = f"{SAFETY:.0%} of {free / GiB:.1f} GiB {source}"
    if prompts <= 1:
        return MicroBatchPlan(1, prompts, 0, 0, budget, source)
    one = saved_bytes(lambda: forward(1), resident)
    two = saved_bytes(lambda: forward(2), resident)
    release_cached_memory(device)
    saved = max(two - one, 1)
    per_prompt = int(BACKWARD_FACTOR * saved)
    fixed = max(one - saved, 0)
    if step is not None and torch.device(device).type == "cpu":
        peaks = resident_peaks(step)  # what forward + backward really take, temporaries and allocator included
        if peaks is not None:
            per_prompt = max(per_prompt, peaks[1] - peaks[0])
            fixed = max(fixed, peaks[0] - per_prompt)
    if budget is None:
        micro = 1
    else:
        micro = max(1, min(prompts, (budget - fixed) // per_prompt))
    return MicroBatchPlan(int(micro), prompts, per_prompt, fixed, budget, source)


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def resident_peaks(step: Callable[[int], None]) -> tuple[int, int] | None:
    """Linux: the process's resident-set peak above its size before, while ``step(1)`` and then ``step(2)`` run (the
    second measured from the same starting size, so that memory the allocator kept from the first still counts);
    None where the kernel does not offer it."""
    clear_refs = Path("/proc/self/clear_refs")
    before = _status("VmRSS:")
    if before is None or not clear_refs.exists():
        return None
    peaks = []
    for count in (1, 2):
        try:
            clear_refs.write_text("5")  # the high-water mark restarts from the current resident set
        except OSError:
            return None
        step(count)
        gc.collect()
        peak = _status("VmHWM:")
        if peak is None:
            return None
        peaks.append(max(peak - before, 0))
    return peaks[0], max(peaks[1], peaks[0])


def resident_storages(modules) -> set[tuple[str, int]]:
    """(device, storage address) of the parameters and buffers of ``modules``: memory already in use, which a saved
    reference to it (a frozen weight kept for the backward pass) does not add to."""
    found = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            found.add((str(t.device), t.untyped_storage().data_ptr()))
    return found


def saved_bytes(fn: Callable[[], object], resident: set[tuple[str, int]] = frozenset()) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``fn()`` runs, less those in
    ``resident``."""
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in resident:
            seen[key] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(seen.values())


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes available to this process on ``device``, where the figure comes from); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "free on the CUDA device"
    if device.type == "mps":
        limit = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return max(limit, 0), "left under MPS's recommended limit"
    return system_available_memory()


def system_available_memory(root: str | os.PathLike = "/") -> tuple[int | None, str]:
    """The system's available memory for this process: Linux ``MemAvailable``, or the cgroup's limit minus its usage
    when that is smaller (``root`` lets tests give a fake /proc and /sys); Windows ``ullAvailPhys``; elsewhere half
    the physical memory."""
    root = Path(root)
    meminfo = _meminfo_available(root / "proc" / "meminfo")
    if meminfo is not None:
        cgroup = _cgroup_room(root)
        if cgroup is not None and cgroup < meminfo:
            return cgroup, "available under the cgroup's memory limit"
        return meminfo, "available system memory"
    if sys.platform == "win32":
        return _windows_available(), "available system memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2, "half the physical memory"
    except (ValueError, OSError, AttributeError):
        return None, "the available memory is unknown"


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_room(root: Path) -> int | None:
    """Limit minus usage of this process's memory cgroup, from its own folder or the hierarchy's root (v2:
    memory.max / memory.current; v1: memory.limit_in_bytes / memory.usage_in_bytes); None without a limit."""
    base = root / "sys" / "fs" / "cgroup"
    v2, v1 = [base], [base / "memory"]
    try:
        for line in (root / "proc" / "self" / "cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3 or not parts[2].strip("/"):
                continue
            if parts[0] == "0" and parts[1] == "":
                v2.insert(0, base / parts[2].strip("/"))
            elif "memory" in parts[1].split(","):
                v1.insert(0, base / "memory" / parts[2].strip("/"))
    except OSError:
        pass
    for folders, limit_file, usage_file in (
        (v2, "memory.max", "memory.current"),
        (v1, "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        for folder in folders:
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None and limit < 2**60:  # v2 "max" reads as None, v1 as ~2**63
                return max(limit - usage, 0)
    return None


def _windows_available() -> int | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong),
            ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong),
            ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong),
            ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong),
            ("ullAvailVirtual", ctypes.c_ulonglong),
            ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """An error that says the device ran out of memory (CUDA, MPS, or a CPU allocation that failed)."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def release_cached_memory(device: torch.device) -> None:
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
