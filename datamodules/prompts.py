"""The one prompt builder: training, evaluation and SHAP all encode tweets here.

A prompt is `prefix + tweet + tail`, tokenized piece by piece and joined by ids, so that
- the prefix (instruction) is token-identical for every tweet and can be cached once,
- a long tweet is truncated inside the tweet, never the tail or the label,
- the label is appended by id, never by re-tokenizing a concatenated string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_modules.errors import UserInputError

PROMPT_STYLES = ("words", "seed-digits")


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]  # prefix + tweet + tail (+ label id when a label was given)
    label_position: int  # index of the label token; the logits at label_position - 1 predict it
    tweet_span: tuple[int, int]  # [start, end) of the tweet tokens in input_ids
    truncated: bool


def _instruction(style: str, label_names: Sequence[str], label_words: Sequence[str]) -> str:
    if style == "seed-digits":
        digits = ", ".join(f"{word.strip()} for {name}" for word, name in zip(label_words, label_names))
        return f"You are a sentiment classifier.\nAnswer with one digit: {digits}.\nTweet:"
    choices = ", ".join(word.strip() for word in label_words)
    return f"You are a sentiment classifier.\nClassify the tweet as one of: {choices}.\nTweet:"


def default_label_words(style: str, label_names: Sequence[str]) -> list[str]:
    if style == "seed-digits":
        return [f" {index}" for index in range(len(label_names))]
    return [f" {name}" for name in label_names]


class PromptEncoder:
    """Encodes tweets for one tokenizer, label space and prompt style."""

    TAIL = "\nLabel:"

    def __init__(
        self,
        tokenizer,
        label_names: Sequence[str],
        label_words: Sequence[str] | None = None,
        style: str = "words",
        max_seq_length: int = 512,
    ):
        if style not in PROMPT_STYLES:
            raise UserInputError(f"Unknown prompt style '{style}'; choose one of {', '.join(PROMPT_STYLES)}.")
        self.tokenizer = tokenizer
        self.style = style
        self.label_names = list(label_names)
        self.label_words = list(label_words) if label_words else default_label_words(style, label_names)
        if len(self.label_words) != len(self.label_names):
            raise UserInputError(
                f"--data.label_words has {len(self.label_words)} words for {len(self.label_names)} classes "
                f"({', '.join(self.label_names)}); give one word per class."
            )
        self.label_token_ids = [self._single_token(word) for word in self.label_words]
        if len(set(self.label_token_ids)) != len(self.label_token_ids):
            raise UserInputError(f"The label words {self.label_words} do not map to distinct tokens; choose others.")
        self.instruction = _instruction(style, self.label_names, self.label_words)
        self.prefix_ids = list(tokenizer(self.instruction)["input_ids"])
        self.tail_ids = list(tokenizer(self.TAIL, add_special_tokens=False)["input_ids"])
        self.max_seq_length = max_seq_length
        self.tweet_budget = max_seq_length - len(self.prefix_ids) - len(self.tail_ids) - 1
        if self.tweet_budget < 1:
            raise UserInputError(
                f"--data.max_seq_length {max_seq_length} leaves no room for the tweet: the template alone takes "
                f"{max_seq_length - self.tweet_budget} tokens; raise it."
            )

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise UserInputError(
                f"The label word {word!r} is {len(ids)} tokens {pieces} for this tokenizer, but the label is read "
                "from one token; pass single-token words with --data.label_words (e.g. ' negative')."
            )
        return ids[0]

    def tweet_ids(self, text: str) -> list[int]:
        """Tokens of the tweet as it follows `Tweet:` (with its leading space)."""
        return list(self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])

    def encode(self, text: str, label: int | None = None) -> EncodedPrompt:
        return self.encode_ids(self.tweet_ids(text), label)

    def encode_ids(self, tweet_ids: Sequence[int], label: int | None = None) -> EncodedPrompt:
        tweet = list(tweet_ids)
        truncated = len(tweet) > self.tweet_budget
        tweet = tweet[: self.tweet_budget]
        ids = self.prefix_ids + tweet + self.tail_ids
        label_position = len(ids)
        if label is not None:
            ids = ids + [self.label_token_ids[label]]
        start = len(self.prefix_ids)
        return EncodedPrompt(ids, label_position, (start, start + len(tweet)), truncated)

    def continuation(self, text: str) -> list[int]:
        """Everything after the cached prefix, up to and including the position that predicts the label."""
        return self.encode(text).input_ids[len(self.prefix_ids) :]

    def describe(self) -> dict:
        """What an adapter must be paired with at evaluation time."""
        return {
            "prompt_style": self.style,
            "label_names": self.label_names,
            "label_words": self.label_words,
            "label_token_ids": self.label_token_ids,
            "instruction": self.instruction,
            "tail": self.TAIL,
        }
