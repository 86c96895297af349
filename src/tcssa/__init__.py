"""tcssa: compress gigapixel whole-slide images into a few semantic slot tokens (TC-SSA).

``import tcssa`` changes nothing in the process and loads no torch: ``tcssa.TCSSA`` and its
config and output classes are fetched from ``tcssa.method`` on first use. The ``tcssa`` command
applies its process-wide settings itself, before torch loads (``tcssa.runtime``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["TCSSA", "TCSSAConfig", "CompressorOutput", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from tcssa.method.compressor import TCSSA, CompressorOutput, TCSSAConfig


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562) so that the command line can set OpenMP's environment before torch starts.
    if name in ("TCSSA", "TCSSAConfig", "CompressorOutput"):
        from tcssa.method import compressor

        return getattr(compressor, name)
    raise AttributeError(f"module 'tcssa' has no attribute {name!r}")
