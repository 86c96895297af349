"""Prompts: question text, chat rendering, token pieces with the slide-token span, strict answer parsing.

A conversation is rendered with the tokenizer's chat template (or, when it has none, with the plain
``USER: / ASSISTANT:`` template below), cut into pieces at turn boundaries, and each piece is
tokenized on its own. Only assistant replies are supervised. The one ``<image>`` placeholder becomes
a span of slide-token positions whose length is chosen when the sample is assembled, because it
depends on the slide (K slot tokens, at most K sampled patches, or one mean token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tcssa.vlm.formats import IMAGE_PLACEHOLDER, Conversation, VQAItem

IGNORE_INDEX = -100  # label of positions that take no part in the loss (torch's cross_entropy default)

ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# Used only when the tokenizer ships no chat template of its own.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CHAT_ROLES = {"human": "user", "gpt": "assistant"}


def format_question(item: VQAItem) -> str:
    """The human turn for a question: the slide, the question, and lettered options if any."""
    lines = [IMAGE_PLACEHOLDER, item.question]
    if item.is_multiple_choice:
        lines += [f"{letter}. {text}" for letter, text in item.options]
        lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


MC_REPLIES = ("letter", "text")


def to_conversation(item: VQAItem | Conversation, mc_reply: str = "letter") -> Conversation:
    """A training conversation. A multiple-choice question is answered with its letter (SlideBench
    style) or, with ``mc_reply="text"``, with the correct option's text; an open question with its text."""
    if isinstance(item, Conversation):
        return item
    if mc_reply not in MC_REPLIES:
        raise ValueError(f"mc_reply must be one of {MC_REPLIES}, got {mc_reply!r}")
    reply = item.answer if item.is_multiple_choice and mc_reply == "letter" else item.answer_text
    return Conversation(item.question_id, item.slide_id, (("human", format_question(item)), ("gpt", reply)))


# ----------------------------------------------------------------------------- strict parsing
# The reply must BE the letter: "B", "(B)", "B.", "B)", "B:" (text may follow the punctuation), optionally
# after "Answer:". A capital letter elsewhere in the text ("Based on...", "A lesion is present") is never
# taken as an answer.
_LETTER_REPLY = re.compile(r"^\s*(?:(?i:answer)\s*:\s*)?(?:\(([A-Z])\)|([A-Z])(?=[.):]|\s*$))")


def parse_letter(reply: str, valid_letters: tuple[str, ...] | list[str]) -> str | None:
    """The option letter a generated reply gives, or None when it does not give one strictly."""
    match = _LETTER_REPLY.match(reply)
    if not match:
        return None
    letter = match.group(1) or match.group(2)
    return letter if letter in valid_letters else None


# ----------------------------------------------------------------------------- tokenization
@dataclass(frozen=True)
class TokenizedConversation:
    """Token pieces of a rendered conversation; the slide span sits between piece ``image_after - 1``
    and piece ``image_after``."""

    pieces: tuple[tuple[tuple[int, ...], bool], ...]  # (token ids, supervised)
    image_after: int  # number of pieces before the slide-token span

    @property
    def num_text_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.pieces)


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]  # True at the slide-token positions


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_pieces(tokenizer, turns, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Rendered text cut at turn boundaries: (text, supervised) with supervised = an assistant reply.

    Each assistant reply is what the full rendering adds after the rendering of the turns before it
    with the generation prompt; a template for which that is not a prefix is rejected, since then the
    prompt seen at evaluation would differ from the one trained on.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    messages: list[dict] = []
    for role, text in turns:
        if role not in _CHAT_ROLES:
            raise ValueError(f"unknown turn role {role!r} (expected human or gpt)")
        if role == "human":
            messages.append({"role": "user", "content": text})
            continue
        prompt = _render(tokenizer, messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": text})
        full = _render(tokenizer, messages, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "the chat template does not render conversations incrementally (a turn changes the text "
                "before it), so prompt and answer cannot be separated; use a template without that"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if add_generation_prompt:
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a generation prompt must end with a human turn")
        prompt = _render(tokenizer, messages, add_generation_prompt=True)
        pieces.append((prompt[len(done) :], False))
    elif messages and messages[-1]["role"] == "user":
        raise ValueError("a training conversation must end with an assistant (gpt) turn")
    return [(text, supervised) for text, supervised in pieces if text]


def tokenize_conversation(tokenizer, turns, add_generation_prompt: bool = False) -> TokenizedConversation:
    """Render and tokenize; the one ``<image>`` placeholder (in a human turn) marks the slide span."""
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if count != 1 or any(IMAGE_PLACEHOLDER in text for role, text in turns if role != "human"):
        raise ValueError(
            f"a prompt must hold exactly one {IMAGE_PLACEHOLDER} placeholder in a human turn, found {count}"
        )
    pieces: list[tuple[tuple[int, ...], bool]] = []
    image_after = -1
    for text, supervised in render_pieces(tokenizer, turns, add_generation_prompt):
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) > 2:
            raise ValueError(f"the chat template repeated the {IMAGE_PLACEHOLDER} placeholder")
        for index, part in enumerate(parts):
            if index == 1:
                image_after = len(pieces)
            ids = tuple(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else ()
            if ids:
                pieces.append((ids, supervised))
    if image_after < 0:
        raise ValueError(f"the chat template dropped the {IMAGE_PLACEHOLDER} placeholder")
    return TokenizedConversation(tuple(pieces), image_after)


def assemble(
    tokenized: TokenizedConversation,
    num_image_tokens: int,
    placeholder_id: int,
    max_length: int | None = None,
) -> EncodedSample:
    """Token ids, labels and slide-position mask for one sample with ``num_image_tokens`` slide tokens.

    Longer than ``max_length``: the end of the text is cut; a cut into the prompt before the slide
    span, or into the span itself, is an error.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    image_mask: list[bool] = []
    for index, (ids, supervised) in enumerate(tokenized.pieces):
        if index == tokenized.image_after:
            _append_image_span(input_ids, labels, image_mask, num_image_tokens, placeholder_id)
        input_ids += ids
        labels += list(ids) if supervised else [IGNORE_INDEX] * len(ids)
        image_mask += [False] * len(ids)
    if tokenized.image_after == len(tokenized.pieces):
        _append_image_span(input_ids, labels, image_mask, num_image_tokens, placeholder_id)
    if max_length is not None and len(input_ids) > max_length:
        span_end = max(i for i, flag in enumerate(image_mask) if flag) + 1 if num_image_tokens else 0
        if span_end >= max_length:
            raise ValueError(
                f"max_length {max_length} is too short: the prompt up to the end of the slide tokens "
                f"already takes {span_end} tokens"
            )
        input_ids, labels, image_mask = input_ids[:max_length], labels[:max_length], image_mask[:max_length]
    return EncodedSample(input_ids, labels, image_mask)


def _append_image_span(input_ids, labels, image_mask, count: int, placeholder_id: int) -> None:
    input_ids += [placeholder_id] * count
    labels += [IGNORE_INDEX] * count
    image_mask += [True] * count


def reply_ids(tokenizer, prompt_turns, reply: str) -> tuple[int, ...]:
    """Token ids of ``reply`` exactly as training supervises it after ``prompt_turns``."""
    tokenized = tokenize_conversation(tokenizer, [*prompt_turns, ("gpt", reply)])
    supervised = [ids for ids, flag in tokenized.pieces if flag]
    return supervised[-1]
