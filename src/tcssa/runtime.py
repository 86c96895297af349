"""Process-wide settings and what this machine can do; nothing here runs on ``import tcssa``.

``apply_process_settings`` is called by the ``tcssa`` command before torch is imported; a library
user who wants the same behaviour calls it first thing. ``cpu_has_bfloat16`` and the one-time
warning are asked by the compressor when it is fed bfloat16 on a CPU. ``process_state`` is this
process's place among torchrun processes, one rule for MIL training and slide extraction.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

#: Where converted weights, downloaded weight files and prepared language models are kept
#: (``$TCSSA_CACHE`` overrides ``~/.cache/tcssa``).
CACHE_ENV = "TCSSA_CACHE"


def cache_root() -> Path:
    """``$TCSSA_CACHE``, else ``~/.cache/tcssa``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tcssa"


def apply_process_settings() -> None:
    """Settings for the whole process, applied by the command-line entry point.

    OpenMP threads that wait for work spin by default. On a machine whose cores are shared with
    other processes the spinning threads fight them for the CPU: training steps here ran 6-9x
    slower with 2 threads than with 1 until idle threads were told to sleep (docs/RESULTS.md,
    "Demo"). It takes effect only before torch starts its thread pool, and never overrides a
    value the user set.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX, as oneDNN sees it);
    True when this torch cannot tell (then nobody is warned wrongly)."""
    import torch  # here, not at the top: the CLI applies process settings before torch loads

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return True


#: How the warning below begins (``tcssa bench`` filters it out: measuring bfloat16 is its point).
BFLOAT16_EMULATED_WARNING = "TCSSA is running in bfloat16 on a CPU without bfloat16 instructions"


@functools.cache
def warn_once_if_cpu_lacks_bfloat16() -> None:
    # Without the instructions torch emulates bfloat16 products: `tcssa bench` measured the
    # bfloat16 forward at 0.30x the float32 speed on such a CPU (docs/RESULTS.md), a trap for
    # anyone who chose bfloat16 to go faster. Memory is still halved, so it stays allowed.
    if not cpu_has_bfloat16():
        warnings.warn(
            f"{BFLOAT16_EMULATED_WARNING} (no AVX512-BF16/AMX): torch emulates them, so this is "
            "about 3x slower than float32 here (it still halves memory). "
            "For speed on this machine use float32.",
            RuntimeWarning,
            stacklevel=3,  # the TCSSA method that was called
        )


def process_state(device: str = "auto"):
    """Accelerate's state of this process (``process_index``, ``num_processes``, ...): one object
    for the whole process, set up by the first call.

    Launched by ``torchrun`` with several processes, that call joins their process group: gloo for
    a CPU ``device`` (or without CUDA), NCCL otherwise. A process started without torchrun joins
    none (under ``torchrun --nproc_per_node 1`` Accelerate makes a group of one, which changes no
    number). A single process asks for the CPU exactly when there is no CUDA, the VLM trainer's rule:
    a MIL model trained first in the same process (``tcssa vqa demo`` trains its compressor on the
    CPU) leaves the VQA stages their GPU.
    """
    import torch  # here: process settings are applied before torch loads
    from accelerate import PartialState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = not torch.cuda.is_available() or (several and device.startswith("cpu"))
    # gloo by name: Accelerate would pick MPI on CPUs where torch has it
    return PartialState(cpu=cpu, **({"backend": "gloo"} if several and cpu else {}))
