"""tcssa: compress gigapixel whole-slide images into a few semantic slot tokens (TC-SSA)."""

from tcssa.compressor import TCSSA, CompressorOutput, TCSSAConfig

__all__ = ["TCSSA", "TCSSAConfig", "CompressorOutput", "__version__"]
__version__ = "0.1.0"
