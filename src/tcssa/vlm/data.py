"""Slide features for the language side: a feature source keyed by slide id, and a conversation dataset.

Feature files are found with the same resolver as the MIL code (``tcssa.data.resolve_feature_files``)
and read with ``tcssa.io.features.read_bag``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tcssa.data import resolve_feature_files
from tcssa.io.features import read_bag
from tcssa.vlm.model import SlideLMBatch, SlideLMConfig, collate
from tcssa.vlm.prompts import TokenizedConversation, assemble, to_conversation, tokenize_conversation


class FolderFeatures:
    """Patch features of the slides in a folder; ``missing`` lists the asked-for slides with no file."""

    def __init__(
        self, features_dir: str | Path, slide_ids, skip_missing: bool = False, cache_slides: int = 64
    ) -> None:
        self.paths, self.missing = resolve_feature_files(features_dir, sorted(set(slide_ids)), skip_missing)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_slides = cache_slides

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.paths

    def load(self, slide_id: str) -> Tensor:
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        if slide_id not in self.paths:
            raise FileNotFoundError(f"no feature file for slide {slide_id!r}")
        features = read_bag(self.paths[slide_id]).features
        if self.cache_slides:
            self._cache[slide_id] = features
            if len(self._cache) > self.cache_slides:
                self._cache.popitem(last=False)
        return features


class MemoryFeatures:
    """Patch features held in a dict (tests, demos)."""

    def __init__(self, features: dict[str, Tensor]) -> None:
        self.features = features
        self.missing: list[str] = []

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.features

    def load(self, slide_id: str) -> Tensor:
        if slide_id not in self.features:
            raise FileNotFoundError(f"no features for slide {slide_id!r}")
        return self.features[slide_id]


class NoFeatures:
    """Every slide "present" with one placeholder patch: for the slide-blind variant, which reads no
    slide, so that questions about slides nobody has features for can still be put to the LM."""

    missing: list[str] = []

    def __contains__(self, slide_id: str) -> bool:
        return True

    def load(self, slide_id: str) -> Tensor:
        return torch.zeros(1, 1)


class ConversationDataset(Dataset):
    """Training samples: tokenized conversations (tokenized once) with their slide's features.

    ``max_patches`` caps the patches of a slide by a random subset per draw (a memory bound for
    training; evaluation always uses every patch).
    """

    def __init__(
        self,
        samples,
        features,
        tokenizer,
        max_patches: int | None = None,
        seed: int = 0,
        mc_reply: str = "letter",
    ) -> None:
        conversations = [to_conversation(s, mc_reply) for s in samples]
        absent = sorted({c.slide_id for c in conversations if c.slide_id not in features})
        if absent:
            raise ValueError(
                f"{len(absent)} training slide(s) have no features: {', '.join(absent[:10])}"
                " (drop their samples, or pass --skip-missing to leave them out and report them)"
            )
        self.conversations = conversations
        self.features = features
        self.max_patches = max_patches
        self.rng = random.Random(seed)
        self.tokenized: list[TokenizedConversation] = [
            tokenize_conversation(tokenizer, c.turns)
            for c in tqdm(conversations, desc="tokenizing", disable=len(conversations) < 2000)
        ]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> tuple[TokenizedConversation, Tensor, str]:
        slide_id = self.conversations[index].slide_id
        features = self.features.load(slide_id)
        if self.max_patches and features.shape[0] > self.max_patches:
            keep = sorted(self.rng.sample(range(features.shape[0]), self.max_patches))
            features = features[torch.tensor(keep)]
        return self.tokenized[index], features, slide_id


def drop_missing(samples, features) -> tuple[list, list[str]]:
    """Samples whose slide has features, and a reason line for each that was left out."""
    kept, dropped = [], []
    for sample in samples:
        if sample.slide_id in features:
            kept.append(sample)
        else:
            sample_id = getattr(sample, "sample_id", None) or getattr(sample, "question_id", "?")
            dropped.append(f"{sample_id}: no features for slide {sample.slide_id}")
    return kept, dropped


class TrainCollator:
    """Assemble each sample with its slide's token count, then pad (right) into a SlideLMBatch."""

    def __init__(self, config: SlideLMConfig, pad_id: int, max_length: int | None = None) -> None:
        self.config = config
        self.pad_id = pad_id
        self.max_length = max_length

    def __call__(self, items) -> SlideLMBatch:
        samples = [
            assemble(tokenized, self.config.num_slide_tokens(features.shape[0]), self.pad_id, self.max_length)
            for tokenized, features, _ in items
        ]
        return collate(samples, [f for _, f, _ in items], [s for _, _, s in items], self.pad_id, "right")
