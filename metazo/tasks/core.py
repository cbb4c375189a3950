"""Task and Example types, and the cleaning and splitting every task goes through."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from metazo.errors import MetazoError

MAX_TEST = 1000
MAX_DEV = 500
TEST_FRACTION = 0.2
DEV_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    """One prompt; the model is scored on the label word that comes right after it.

    `prompt` has no trailing space: label words carry their own leading space.
    `num_choices` limits the options to the first label words (multiple choice with fewer
    options than label words); None means every label word is an option.
    """

    prompt: str
    label: int
    num_choices: int | None = None


@dataclass
class Task:
    """A classification task scored through one label word per class."""

    name: str
    label_words: list[str]
    template: str
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: str

    def label_token_ids(self, tokenizer) -> list[int]:
        """Token id of each label word for `tokenizer`; each word must be exactly one token."""
        token_ids = []
        for word in self.label_words:
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise MetazoError(
                    f"label word {word!r} of task '{self.name}' is {len(ids)} tokens {pieces} for this "
                    "tokenizer; choose a label word that is a single token (usually with a leading space)"
                )
            token_ids.append(ids[0])
        for i, first in enumerate(token_ids):
            for j in range(i + 1, len(token_ids)):
                if token_ids[j] == first:
                    raise MetazoError(
                        f"label words {self.label_words[i]!r} and {self.label_words[j]!r} of task "
                        f"'{self.name}' are the same token (id {first}); choose distinct label words"
                    )
        return token_ids


def render(template: str, text: str) -> str:
    """Put `text` into `template` (plain replacement: texts and templates may contain braces)."""
    return template.replace("{text}", text)


def read_text(path: Path) -> str:
    """Decode as UTF-8, falling back to latin-1 (a few packaged data files are latin-1)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: drop a byte-order mark if there is one
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_text(text: str) -> str:
    """Collapse all runs of whitespace (newlines, tabs) into single spaces."""
    return " ".join(text.split())


def deduplicate(examples: list[Example]) -> list[Example]:
    """Keep the first copy of each prompt; drop every copy of a prompt seen with two labels.

    A prompt with conflicting labels cannot be learned, and copies of one prompt in both
    train and test would leak the answer, so the split must see each prompt once.
    """
    labels_by_prompt: dict[str, set[int]] = {}
    for example in examples:
        labels_by_prompt.setdefault(example.prompt, set()).add(example.label)
    seen: set[str] = set()
    kept = []
    for example in examples:
        if example.prompt in seen or len(labels_by_prompt[example.prompt]) > 1:
            continue
        seen.add(example.prompt)
        kept.append(example)
    return kept


def split_sizes(num_examples: int) -> tuple[int, int, int]:
    """(train, dev, test) sizes: test = min(1000, 20%), dev = min(500, 10%), the rest train."""
    test = min(MAX_TEST, int(num_examples * TEST_FRACTION))
    dev = min(MAX_DEV, int(num_examples * DEV_FRACTION))
    return num_examples - dev - test, dev, test


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    """A copy in a seeded order that is the same on every machine and Python 3 version."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order


def split_examples(
    examples: list[Example], seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded (train, dev, test) split with the sizes of `split_sizes`."""
    order = shuffled(examples, seed)
    num_train, num_dev, _ = split_sizes(len(order))
    return order[:num_train], order[num_train : num_train + num_dev], order[num_train + num_dev :]


def cap_train(train: list[Example], max_train: int | None) -> list[Example]:
    """The first `max_train` training examples (train is already shuffled)."""
    if max_train is None:
        return train
    if max_train < 1:
        raise MetazoError(f"max_train must be at least 1, got {max_train}")
    return train[:max_train]


def build_task(
    name: str,
    examples: list[Example],
    *,
    label_words: list[str],
    template: str,
    source: str,
    seed: int,
    max_train: int | None,
) -> Task:
    """Deduplicate, split and wrap examples drawn from one pool."""
    examples = deduplicate(examples)
    if not examples:
        raise MetazoError(f"task '{name}' has no examples after dropping empty texts; check {source}")
    train, dev, test = split_examples(examples, seed)
    return Task(
        name=name,
        label_words=list(label_words),
        template=template,
        train=cap_train(train, max_train),
        dev=dev,
        test=test,
        source=source,
    )
