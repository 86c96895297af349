"""Time (interleaved medians in this process) and peak memory (one child process per method)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, replace

import torch
from torch import Tensor

from tcssa.bench.config import BenchConfig
from tcssa.bench.workloads import (
    build_cohort_method,
    build_method,
    cohort_slides,
    method_input,
    synthetic_slide,
)
from tcssa.runtime import BFLOAT16_EMULATED_WARNING

MIB = 1 << 20


def time_call(fn: Callable, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, Callable[[], object]],
    repeats: int | dict[str, int],
    warmup: bool = True,
    cpu: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median wall-clock seconds of each call over its repeats, the calls run round-robin so that
    a burst of load on the shared machine hits all of them alike; with ``warmup``, one untimed
    call each first. ``repeats`` may differ per call (a call that takes minutes gets fewer).
    ``cpu``, when given, receives each call's median CPU seconds of this process (user +
    system): on a machine shared with other work, that is the steadier measure of the work done."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(calls, repeats)
    if warmup:
        for call in calls.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    used: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(max(counts.values(), default=0)):
        for name, call in calls.items():
            if round_ < counts[name]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                call()
                wall[name].append(time.perf_counter() - start_wall)
                used[name].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.update({name: statistics.median(values) for name, values in used.items()})
    return {name: statistics.median(values) for name, values in wall.items()}


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:  # not Linux: the peak so far is the best we have
        return _peak_rss_mib()


def _peak_rss_mib() -> float:
    # VmHWM, the kernel's peak-RSS mark of this process's memory, which clear_refs resets. It is
    # what ru_maxrss reports too, except that ru_maxrss also remembers the parent's RSS at fork
    # (Linux keeps it across exec), which would hide a small child behind a big parent.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, which ru_maxrss reports
        return True
    except OSError:
        return False


def quiet_bfloat16_warning() -> None:
    """Measuring bfloat16 is the point of the benchmark; the machine record says whether it is native."""
    warnings.filterwarnings("ignore", message=re.escape(BFLOAT16_EMULATED_WARNING), category=RuntimeWarning)


def run_probe(spec: dict) -> list[dict]:
    """Child-process side of a memory probe: run one method at each size, report peak RSS."""
    _return_freed_memory_at_once()
    quiet_bfloat16_warning()
    if spec["config"].get("threads"):
        torch.set_num_threads(spec["config"]["threads"])
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    method, results = spec["method"], []
    if spec.get("cap_gib"):
        extra = int(spec["cap_gib"] * (1 << 30))
        with open("/proc/self/statm") as f:
            virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (virtual + extra, resource.RLIM_INFINITY))
    if method.startswith("cohort-"):
        slides = cohort_slides(config)
        run = build_cohort_method(method, config)
        inputs = [(sum(len(s) for s in slides), slides)]
    else:
        run = build_method(method, config)
        inputs = [(n, None) for n in spec["sizes"]]
    _load_shared_code(config)
    warm = True
    for size, data in inputs:
        row = {"method": method, "n": size}
        try:
            if data is None:
                data = spec["files"][str(size)] if method == "tcssa-h5" else synthetic_slide(size, config.dim)
                data = method_input(method, data) if isinstance(data, Tensor) else data
            with torch.inference_mode():
                if warm:  # one-time library set-up (thread pools, BLAS buffers) is not the method's
                    run(data)
                    warm = False
                gc.collect()
                row["rss_before_mib"] = _rss_mib()
                row["peak_reset"] = _reset_peak_rss()
                row["probe_seconds"] = time_call(run, data)
            row["peak_rss_mib"] = _peak_rss_mib()
            row["work_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
            row["probe_s"] = row["probe_seconds"]
            row["status"] = "ok"
        except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
            asked = re.search(r"allocate (\d+) bytes", str(err))
            needed = f", one allocation asked for {int(asked.group(1)) / (1 << 30):.1f} GiB" if asked else ""
            row["status"] = f"out of memory (address-space cap {spec.get('cap_gib')} GiB{needed})"
            results.append(row)
            break
        data = None
        results.append(row)
        if row["probe_seconds"] > config.probe_time_budget_s:  # larger sizes would take longer still
            break
    return results


def _return_freed_memory_at_once() -> None:
    # glibc keeps freed buffers below its (adaptive) mmap threshold for reuse, and RSS with them;
    # a fixed 128 KiB threshold makes every larger buffer go back to the system when freed.
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: measurements may then include some retained buffers


def _load_shared_code(config: BenchConfig) -> None:
    """Run every compression method once on a toy slide, so that each probe child starts with the
    same library code paged in: RSS counts code pages, and a method should not be charged for
    torch kernels that another method merely happened not to load first."""
    toy = replace(config, dim=32, num_slots=4)
    x = synthetic_slide(64, toy.dim)
    with torch.inference_mode():
        for name in ("reference", "tcssa", "tcssa-bf16"):
            build_method(name, toy)(method_input(name, x))
    gc.collect()


def probe_many(jobs: list[dict], workers: int) -> list[list[dict]]:
    """``probe_memory(**job)`` for each job, ``workers`` child processes at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: probe_memory(**job), jobs))


def _probe_context():
    # Children fork from a server that has imported torch and tcssa once (a fresh exec would
    # pay that import, seconds, per probe); the server runs no torch op, so forking it is safe.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tcssa.bench"])
    return context


def probe_memory(
    method: str,
    sizes: Sequence[int],
    config: BenchConfig,
    files: dict | None = None,
    cap_gib: float | None = None,
) -> list[dict]:
    """Run ``run_probe`` in a fresh child process and return its rows."""
    spec = {"method": method, "sizes": list(sizes), "config": asdict(config), "files": files or {}}
    spec["cap_gib"] = cap_gib
    try:
        with ProcessPoolExecutor(1, mp_context=_probe_context()) as child:
            return child.submit(run_probe, spec).result()
    except BrokenProcessPool:
        return [{"method": method, "n": n, "status": "child process killed (out of memory?)"} for n in sizes]
