"""Small shared builders for the slide-VQA tests: a tokenizer and a from-config LM in a second or two."""

import torch

from tcssa.vlm.formats import VQAItem
from tcssa.vlm.model import SlideLM, SlideLMConfig
from tcssa.vlm.tiny_lm import TinyLMConfig, tiny_lm_from_config, train_tokenizer

D = 12
WORDS = (
    "Which tissue dominates in this slide? Is a lesion present? tumour stroma fat necrosis lymphocytes "
    "yes no the slide shows a carcinoma with invasive growth and clear margins"
)


def tiny_tokenizer():
    return train_tokenizer([WORDS] * 4, vocab_size=300)


def tiny_lm(tokenizer, seed=0):
    config = TinyLMConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return tiny_lm_from_config(config, tokenizer, seed=seed).eval()


def tiny_slidelm(lm, variant="slots", num_tokens=4, seed=0):
    torch.manual_seed(seed)
    config = SlideLMConfig(
        feature_dim=D,
        lm_hidden=lm.config.hidden_size,
        slide_tokens=variant,
        num_tokens=num_tokens,
        projector_hidden=16,
        compressor={"expert_hidden": 8},
    )
    return SlideLM(lm, config).eval()


def mc_item(question_id, slide_id, answer="B", question="Which tissue dominates?"):
    options = (("A", "tumour"), ("B", "stroma"), ("C", "fat"), ("D", "necrosis"))
    return VQAItem(question_id, slide_id, question, options, answer, "Microscopy", "Tissue")
