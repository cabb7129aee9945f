"""The one prompt builder: training, evaluation and SHAP all encode tweets here.

A prompt is `prefix + tweet + tail`, tokenized piece by piece and joined by ids, so that
- the prefix (instruction) is token-identical for every tweet and can be cached once,
- a long tweet is truncated inside the tweet, never the tail or the label,
- the label is appended by id, never by re-tokenizing a concatenated string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foundation.errors import UserInputError

PROMPT_STYLES = ("words", "seed-digits")


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]  # prefix + tweet + tail (+ label id when a label was given)
    label_position: int  # index of the label token; the logits at label_position - 1 predict it
    tweet_span: tuple[int, int]  # [start, end) of the tweet tokens in input_ids
    truncated: bool


def _instruction(
    style: str, label_names: Sequence[str], label_words: Sequence[str], demonstrations: Sequence[tuple[str, int]]
) -> str:
    if style == "seed-digits":
        digits = ", ".join(f"{word.strip()} for {name}" for word, name in zip(label_words, label_names))
        header = f"You are a sentiment classifier.\nAnswer with one digit: {digits}.\n"
    else:
        choices = ", ".join(word.strip() for word in label_words)
        header = f"You are a sentiment classifier.\nClassify the tweet as one of: {choices}.\n"
    # k-shot demonstrations sit inside the fixed prefix, so the prefix cache serves them too.
    shots = "".join(
        f"Tweet: {' '.join(text.split())}{PromptEncoder.TAIL}{label_words[label]}\n\n" for text, label in demonstrations
    )
    return f"{header}{shots}Tweet:"


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
        demonstrations: Sequence[tuple[str, int]] = (),
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
        self.demonstrations = [(text, int(label)) for text, label in demonstrations]
        self.instruction = _instruction(style, self.label_names, self.label_words, self.demonstrations)
        self.prefix_ids = list(tokenizer(self.instruction)["input_ids"])
        self.tail_ids = list(tokenizer(self.TAIL, add_special_tokens=False)["input_ids"])
        self.max_seq_length = max_seq_length
        self.tweet_budget = max_seq_length - len(self.prefix_ids) - len(self.tail_ids) - 1
        if self.tweet_budget < 1:
            raise UserInputError(
                f"--data.max_seq_length {max_seq_length} leaves no room for the tweet: the template"
                f"{' and its demonstrations' if demonstrations else ''} alone take "
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
            "num_demonstrations": len(self.demonstrations),
        }


def sample_demonstrations(
    texts: Sequence[str],
    labels: Sequence[int],
    k: int,
    num_classes: int,
    seed: int,
    exclude_texts: Sequence[str] = (),
) -> list[tuple[str, int]]:
    """k seeded, class-balanced demonstrations from the given (training) rows, none of whose texts is excluded.

    Each class gets k // num_classes shots, the first k % num_classes classes (in a seeded order) one more; the
    shots are then shuffled so that no class always sits next to the query.
    """
    import numpy as np

    if k <= 0:
        return []
    rng = np.random.default_rng(seed)
    excluded = {" ".join(t.split()) for t in exclude_texts}
    pools = {
        c: [i for i, y in enumerate(labels) if y == c and " ".join(texts[i].split()) not in excluded]
        for c in range(num_classes)
    }
    extra = set(rng.permutation(num_classes)[: k % num_classes].tolist())
    chosen: list[tuple[str, int]] = []
    for cls in range(num_classes):
        want = k // num_classes + (1 if cls in extra else 0)
        if want > len(pools[cls]):
            raise UserInputError(
                f"Cannot draw {want} demonstrations of class {cls} from the training split (only {len(pools[cls])} "
                "rows); lower the number of demonstrations."
            )
        for index in rng.choice(pools[cls], size=want, replace=False):
            chosen.append((texts[int(index)], cls))
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]
