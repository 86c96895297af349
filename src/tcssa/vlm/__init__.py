"""Slide question answering: TC-SSA slot tokens in a Hugging Face causal language model.

Heavy dependencies (transformers, peft, accelerate; the ``vlm`` extra) are imported by the modules
that need them, and this package's exports on first use, so ``import tcssa.vlm`` (and
``tcssa.vlm.config``, which the command line reads) loads no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tcssa.vlm.formats import Conversation, VQAItem, VQASet, load_questions
    from tcssa.vlm.model import SLIDE_TOKEN_VARIANTS, SlideLM, SlideLMBatch, SlideLMConfig
    from tcssa.vlm.prompts import format_question, parse_letter, to_conversation

#: Exported name -> its module, imported on first use (PEP 562).
_EXPORTS = {
    "SLIDE_TOKEN_VARIANTS": "tcssa.vlm.model",
    "Conversation": "tcssa.vlm.formats",
    "SlideLM": "tcssa.vlm.model",
    "SlideLMBatch": "tcssa.vlm.model",
    "SlideLMConfig": "tcssa.vlm.model",
    "VQAItem": "tcssa.vlm.formats",
    "VQASet": "tcssa.vlm.formats",
    "format_question": "tcssa.vlm.prompts",
    "load_questions": "tcssa.vlm.formats",
    "parse_letter": "tcssa.vlm.prompts",
    "to_conversation": "tcssa.vlm.prompts",
}
__all__ = [
    "SLIDE_TOKEN_VARIANTS",
    "Conversation",
    "SlideLM",
    "SlideLMBatch",
    "SlideLMConfig",
    "VQAItem",
    "VQASet",
    "format_question",
    "load_questions",
    "parse_letter",
    "to_conversation",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
