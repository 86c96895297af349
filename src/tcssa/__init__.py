"""tcssa: compress gigapixel whole-slide images into a few semantic slot tokens (TC-SSA)."""

import os

# OpenMP threads that wait for work spin by default. On a machine whose cores are shared with other
# processes the spinning threads fight them for the CPU: training steps here ran 6-9x slower with 2
# threads than with 1 until idle threads were told to sleep (docs/RESULTS.md, "Demo"). This only
# takes effect when tcssa is imported before torch, and never overrides a value the user set.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tcssa.compressor import TCSSA, CompressorOutput, TCSSAConfig  # noqa: E402

__all__ = ["TCSSA", "TCSSAConfig", "CompressorOutput", "__version__"]
__version__ = "0.1.0"
