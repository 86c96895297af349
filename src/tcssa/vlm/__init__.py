"""Slide question answering: TC-SSA slot tokens in a Hugging Face causal language model.

Heavy dependencies (transformers, peft, accelerate; the ``vlm`` extra) are imported by the modules
that need them, so ``import tcssa.vlm`` stays light.
"""

from tcssa.vlm.formats import Conversation, VQAItem, VQASet, load_questions
from tcssa.vlm.model import SLIDE_TOKEN_VARIANTS, SlideLM, SlideLMBatch, SlideLMConfig
from tcssa.vlm.prompts import format_question, parse_letter, to_conversation

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
