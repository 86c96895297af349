"""The TC-SSA method (docs/METHOD.md) on tensors: no file formats, no labels, no language models."""

from tcssa.method.compressor import TCSSA, CompressorOutput, TCSSAConfig

__all__ = ["TCSSA", "TCSSAConfig", "CompressorOutput"]
