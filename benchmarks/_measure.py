"""What every benchmark needs to measure: the device, a synchronising clock, peak memory, and the
machine's description. Peak memory of one piece of work:

- CUDA: `torch.cuda.max_memory_allocated()` above what was allocated when the work began.
- CPU: the process's peak resident set (`getrusage(RUSAGE_SELF).ru_maxrss`) above its resident set
  when the work began. The peak is reset first (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so
  an earlier peak (imports, building the inputs) cannot hide the work's; where that is refused the
  figure is a lower bound and says so. Run each variant in its own process so peaks do not mix.
"""

from __future__ import annotations

import platform
import re
import resource
import time
from pathlib import Path

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(dev: torch.device) -> torch.dtype:
    # bf16 matmuls are hundreds of times slower than fp32 on CPUs without AVX512-BF16/AMX
    from hld.precision import resolve_dtype

    return resolve_dtype("auto", dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakMemory:
    """`with PeakMemory(dev) as pm: work()` then `pm.bytes` (peak above the start) and `pm.exact`."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.bytes = 0
        self.exact = True

    def __enter__(self) -> PeakMemory:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            except OSError:
                self.exact = False  # an earlier, higher peak may hide part of this one
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = max(0, _maxrss_bytes() - self.start)


def timed(fn, dev: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device synchronised on both sides."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "revision": revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        return info
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text)
        flags = re.search(r"flags\s*:\s*(.*)", text)
        flagset = set(flags.group(1).split()) if flags else set()
        info["device"] = model.group(1).strip() if model else platform.processor()
        info["cpus"] = text.count("processor\t:")
        info["simd"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flagset]
    except OSError:
        info["device"] = platform.processor()
    return info


def revision() -> str:
    """The commit measured, '+dirty' when src/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def guard_cpu_memory(share: float = 0.9) -> None:
    """Make an allocation beyond `share` of the RAM now available fail in this process (a Python
    error) instead of waking the kernel's OOM killer, which could pick a neighbour's job."""
    try:
        text = Path("/proc/meminfo").read_text()
        avail = int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024
        vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return
    limit = vm + int(share * avail)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
