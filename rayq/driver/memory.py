"""Memory figures of the current process: peak resident memory and the default weight cap."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

# Default weight cap as a fraction of a worker's memory. On a GPU the rest is for activations,
# the quantized codes of the scoring bank and the allocator's slack. On a CPU worker the node's
# memory is shared with the object store and the other workers on the node.
GPU_FRACTION = 0.5
CPU_FRACTION = 0.25


def _status_bytes(field: str) -> int | None:
    """Read one memory field of /proc/self/status in bytes; None where it is missing (not Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last `reset_peak_rss`.

    Reads VmHWM from /proc on Linux; elsewhere falls back to getrusage, whose peak never resets.
    """
    peak = _status_bytes("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def shared_rss_bytes() -> int:
    """Resident shared memory of this process now (RssShmem on Linux; 0 where it is missing).

    On a Ray worker this is mostly the object store's pages that the worker wrote results to or
    read arguments from. Ray budgets them as object store memory, shared by the node.
    """
    return _status_bytes("RssShmem") or 0


def peak_private_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss`, less the shared memory mapped now.

    A worker's results go into Ray's object store after its method returns, so the shared pages
    do not change during a call and this is the call's peak of the worker's own memory. Without
    the subtraction, each result a worker had written would count in its later peaks.
    """
    return peak_rss_bytes() - shared_rss_bytes()


def rss_bytes() -> int:
    """Resident memory of this process now (Linux); the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident memory of this process to its current value (Linux).

    Returns False where the kernel does not allow it; the peak then keeps counting from the start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold each time a large chunk is freed, up to 32 MiB, so later
    tensors of a few MiB come from the heap, which it seldom shrinks. Without a trim, each
    block's weights would leave the worker's resident memory higher than the block before.
    """
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def device_memory_bytes() -> tuple[str, int]:
    """Return the device this process computes on and its memory: the first GPU, else the RAM."""
    import torch

    if torch.cuda.is_available():
        return "cuda", int(torch.cuda.get_device_properties(0).total_memory)
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_weight_cap_bytes() -> int:
    """Return the weight cap of a worker whose job sets none: a fraction of its device memory."""
    device, total = device_memory_bytes()
    return int(total * (GPU_FRACTION if device == "cuda" else CPU_FRACTION))
