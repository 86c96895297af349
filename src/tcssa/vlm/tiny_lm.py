"""The offline default language model: no weights can be downloaded, so build one.

``build_tiny_lm`` trains a byte-level BPE tokenizer with the ``tokenizers`` library on the run's own
text, builds a small Qwen2 causal LM from a config, and saves both as an ordinary Hugging
Face model folder, so that everything downstream loads it exactly as it would load a real local model
(``AutoModelForCausalLM.from_pretrained(folder)``, ``AutoTokenizer.from_pretrained(folder)``).

``warm_up_lm`` optionally trains that model on the text alone (next-token prediction, no slide), so
that it stands in for a pretrained LLM that already knows the language of the questions and reports.
"""

from __future__ import annotations

# transformers and tokenizers come with the optional `vlm` extra: imported where they are used, so
# that the rest of tcssa (and `tcssa --help`) runs without them.
import json
import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tcssa.vlm.prompts import PLAIN_CHAT_TEMPLATE

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class TinyLMConfig:
    """Size of the from-config language model (defaults: ~1M parameters, seconds per step on a CPU)."""

    vocab_size: int = 2000  # upper bound for the trained tokenizer
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 4096

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer (every string encodable) wrapped as a transformers fast tokenizer.

    It pre-tokenizes exactly as ``Qwen2Tokenizer`` does, because ``AutoTokenizer`` rebuilds a Qwen2
    model folder's tokenizer with that class's normaliser and pre-tokenizer: trained any other way, the
    reloaded tokenizer would split text differently from the one the model was trained with.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast  # the optional vlm extra
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # the optional vlm extra

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat template's own words belong in the vocabulary too.
    scaffold = ["USER: ", "ASSISTANT: ", "\n"] + [f" {chr(c)}" for c in range(ord("A"), ord("Z") + 1)]
    tokenizer.train_from_iterator([*scaffold, *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=PLAIN_CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def tiny_lm_from_config(config: TinyLMConfig, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of the given size, matching the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen2Config  # the optional vlm extra

    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


def build_tiny_lm(out_dir: str | Path, texts: list[str], config: TinyLMConfig | None = None, seed: int = 0):
    """Train a tokenizer on ``texts``, build the LM, save both to ``out_dir``; returns (lm, tokenizer)."""
    config = config or TinyLMConfig()
    if not texts:
        raise ValueError("the tiny LM's tokenizer needs training text; got none")
    tokenizer = train_tokenizer(texts, config.vocab_size)
    lm = tiny_lm_from_config(config, tokenizer, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_round_trip(out_dir, tokenizer, texts[:50])
    (out_dir / "tiny_lm.json").write_text(json.dumps({**asdict(config), "seed": seed}, indent=2))
    return lm, tokenizer


def warm_up_lm(
    lm,
    tokenizer,
    texts: list[str],
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    max_length: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Next-token training of the whole LM on plain text (no slides); returns the loss per step."""
    if steps <= 0:
        return []
    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token or ""
    encoded = [tokenizer(t + eos, add_special_tokens=False)["input_ids"][:max_length] for t in texts if t]
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    lm.train()
    losses = []
    for _ in tqdm(range(steps), desc="LM warm-up on text", disable=not progress):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        loss = lm(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    lm.eval()
    return losses


def _check_round_trip(folder: Path, tokenizer, texts: list[str]) -> None:
    from transformers import AutoTokenizer  # the optional vlm extra

    reloaded = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        if (
            reloaded(text, add_special_tokens=False)["input_ids"]
            != tokenizer(text, add_special_tokens=False)["input_ids"]
        ):
            raise RuntimeError(f"the tokenizer saved in {folder} does not reload to the same encoding")
