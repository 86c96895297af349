"""`tcssa bench`: speed and memory of TC-SSA from 10^3 to 10^6 patches, side by side with the
published code's formulation, measured in one run.

The reference (``reference.ReferenceTCSSA``) is written from docs/METHOD.md the way the
published code does it: batch size 1, a dense N x K top-2 mask, a dense bmm, a Python loop
over the K expert MLPs, one optimizer step per slide. Every target of the issue is a ratio to
it, taken in the same run, because the machines here are shared and noisy.

How it measures
- Time: the methods of one comparison run round-robin in one process (reference, ours,
  reference, ours, ...), and each gets the median of its repeats. Compression runs under
  ``torch.inference_mode``.
- Memory: each method runs in a child process of its own, forked from a server process that
  has only imported torch and tcssa, sizes in increasing order, after one untimed warm-up call
  (one-time library set-up is not the method's). Before each size the child resets the
  kernel's peak-RSS mark (``/proc/self/clear_refs``); ``peak_rss_mib`` is then that size's
  peak resident memory of the whole process (Python, torch, model, input, work), the kernel's
  VmHWM: the counter behind ``resource.getrusage``'s ru_maxrss, read from /proc because
  ru_maxrss also carries the parent's peak across fork and exec. ``work_mib`` is the peak minus
  the resident memory just before the call. The child has glibc return freed buffers to the
  system at once (``mallopt`` M_MMAP_THRESHOLD), so one size's leftovers do not hide the next
  one's. tracemalloc is not used: it does not see torch's allocations. A child may run under an
  address-space cap, so that a method that needs too much memory (dense self-attention) fails
  cleanly instead of swapping.

Modules: ``config`` (what is measured), ``reference`` (the published formulation and the two
training loops), ``workloads`` (inputs and methods), ``measure`` (timing and memory probes),
``runner`` (the sections), ``report`` (targets, table, files, plot).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tcssa.bench.config import METHODS, QUICK, SECTIONS, BenchConfig
    from tcssa.bench.measure import interleaved_medians, probe_many, probe_memory
    from tcssa.bench.reference import ReferenceClassifier, ReferenceTCSSA, build_classifiers
    from tcssa.bench.report import (
        COLUMNS,
        BenchResult,
        evaluate_targets,
        fit_exponent,
        format_bench_table,
        write_outputs,
    )
    from tcssa.bench.runner import measure_h5_streaming, run_bench

#: Exported name -> its module, imported on first use (PEP 562): the command line builds
#: `tcssa bench`'s flags from tcssa.bench.config, and that must not load torch.
_EXPORTS = {
    "METHODS": "tcssa.bench.config",
    "QUICK": "tcssa.bench.config",
    "SECTIONS": "tcssa.bench.config",
    "BenchConfig": "tcssa.bench.config",
    "interleaved_medians": "tcssa.bench.measure",
    "probe_many": "tcssa.bench.measure",
    "probe_memory": "tcssa.bench.measure",
    "ReferenceClassifier": "tcssa.bench.reference",
    "ReferenceTCSSA": "tcssa.bench.reference",
    "build_classifiers": "tcssa.bench.reference",
    "COLUMNS": "tcssa.bench.report",
    "BenchResult": "tcssa.bench.report",
    "evaluate_targets": "tcssa.bench.report",
    "fit_exponent": "tcssa.bench.report",
    "format_bench_table": "tcssa.bench.report",
    "write_outputs": "tcssa.bench.report",
    "measure_h5_streaming": "tcssa.bench.runner",
    "run_bench": "tcssa.bench.runner",
}
__all__ = [
    "COLUMNS",
    "METHODS",
    "QUICK",
    "SECTIONS",
    "BenchConfig",
    "BenchResult",
    "ReferenceClassifier",
    "ReferenceTCSSA",
    "build_classifiers",
    "evaluate_targets",
    "fit_exponent",
    "format_bench_table",
    "interleaved_medians",
    "measure_h5_streaming",
    "probe_many",
    "probe_memory",
    "run_bench",
    "write_outputs",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
