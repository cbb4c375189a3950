"""Tasks from the user's own data: local .jsonl/.json/.csv/.tsv files or a Hugging Face dataset.

Rows are dicts. A text row has a text column and a label column, and needs label words (one per
label value). A multiple-choice row also has a `choices` list; its label is the index (or the
text) of the correct choice, and its label words are the letters " A", " B", ...
"""

from __future__ import annotations

import csv
import io
import json
import string
from pathlib import Path

from metazo.errors import MetazoError
from metazo.tasks.core import Example, clean_text, read_text, render

DEFAULT_USER_TEMPLATE = "{text}\nAnswer:"
CHOICES_FIELD = "choices"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
LETTERS = string.ascii_uppercase


def parse_label_words(spec: str) -> dict[str, str]:
    """Parse "pos= great,neg= terrible" into {"pos": " great", "neg": " terrible"}.

    Leading spaces in a word are kept; a word without one gets one, because label words follow
    the prompt directly and a GPT-style tokenizer folds the space into the word's token.
    """
    words: dict[str, str] = {}
    for pair in spec.split(","):
        label, separator, word = pair.partition("=")
        label, word = label.strip(), word.rstrip()
        if not separator or not label or not word.strip():
            raise MetazoError(
                f"bad label words {spec!r}: write LABEL=WORD pairs separated by commas, e.g. 'pos= great,neg= terrible'"
            )
        if label in words:
            raise MetazoError(f"label {label!r} appears twice in label words {spec!r}; give one word per label")
        words[label] = word if word.startswith(" ") else " " + word
    return words


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl/.json (one object per line, or one JSON list) or .csv/.tsv (with a header) file."""
    if not path.is_file():
        raise MetazoError(f"data file {path} not found; check the path")
    text = read_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    if text.lstrip().startswith("["):
        rows = parse_json(text, path, line_number=None)
        if not isinstance(rows, list):
            raise MetazoError(f"{path} must hold one JSON object per line, or one list of objects")
    else:
        rows = [parse_json(line, path, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise MetazoError(f"{path} row {number} is not a JSON object; write one object per line")
    return rows


def parse_json(text: str, path: Path, line_number: int | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line_number}" if line_number else f"line {error.lineno}"
        raise MetazoError(f"{path} {where} is not valid JSON ({error.msg}); write one JSON object per line") from None


def label_key(value) -> str:
    """Label value as the string that label words are keyed by (JSON true/false stay lower case)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).strip()


def sorted_label_keys(keys: set[str]) -> list[str]:
    """Numeric order when every label is a number (so "10" comes after "9"), else string order."""
    try:
        return sorted(keys, key=float)
    except ValueError:
        return sorted(keys)


def column(row: dict, name: str, where: str, number: int):
    if name not in row:
        present = ", ".join(str(key) for key in row)
        raise MetazoError(f"column '{name}' not found in {where} (row {number}); columns present: {present}")
    return row[name]


def label_words_by_key(keys: set[str], label_words: dict[str, str] | list[str] | None, where: str) -> dict[str, str]:
    """Map each label value found in the data to its word, in the order the words were given."""
    found = ", ".join(sorted_label_keys(keys))
    if label_words is None:
        example = ",".join(f"{key}= WORD" for key in sorted_label_keys(keys))
        raise MetazoError(
            f"{where} needs label words for its labels ({found}); give one single-token word per label, "
            f"e.g. label_words / --label-words \"{example}\""
        )
    if isinstance(label_words, dict):
        by_key = {label_key(key): word for key, word in label_words.items()}
        for key in sorted_label_keys(keys):
            if key not in by_key:
                raise MetazoError(
                    f"label '{key}' in {where} has no label word; add one, e.g. \"{key}= WORD\" (labels found: {found})"
                )
        return by_key
    if len(label_words) != len(keys):
        raise MetazoError(
            f"{len(label_words)} label words given but {where} has {len(keys)} labels ({found}); "
            "give one word per label, in this order"
        )
    return dict(zip(sorted_label_keys(keys), label_words))


def text_examples(
    rows_by_split: dict[str, list[dict]],
    *,
    text_column: str,
    label_column: str,
    label_words: dict[str, str] | list[str] | None,
    template: str,
    where: str,
) -> tuple[dict[str, list[Example]], list[str]]:
    """Examples per split from text rows, and the label words in label-index order."""
    texts_by_split: dict[str, list[tuple[str, str]]] = {}
    for split, rows in rows_by_split.items():
        pairs = []
        for number, row in enumerate(rows, 1):
            text = column(row, text_column, where, number)
            key = label_key(column(row, label_column, where, number))
            pairs.append(("" if text is None else clean_text(str(text)), key))
        texts_by_split[split] = pairs
    keys = {key for pairs in texts_by_split.values() for text, key in pairs if text}
    if not keys:
        raise MetazoError(f"{where} has no rows with text in column '{text_column}'; give a file with data")
    word_by_key = label_words_by_key(keys, label_words, where)
    index_by_key = {key: index for index, key in enumerate(word_by_key)}
    examples = {
        split: [Example(render(template, text), index_by_key[key]) for text, key in pairs if text]
        for split, pairs in texts_by_split.items()
    }
    return examples, list(word_by_key.values())


def choice_index(label, choices: list[str], where: str, number: int) -> int:
    """The label of a multiple-choice row is the index of the right choice, or its text."""
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(choices):
            return label
    elif isinstance(label, str) and clean_text(label) in choices:
        return choices.index(clean_text(label))
    raise MetazoError(
        f"label {label!r} in {where} row {number} is neither an index into its {len(choices)} choices "
        "nor one of their texts; give the index of the correct choice"
    )


def choice_examples(
    rows_by_split: dict[str, list[dict]], *, text_column: str, label_column: str, template: str, where: str
) -> tuple[dict[str, list[Example]], list[str]]:
    """Examples per split from multiple-choice rows, and the letter label words " A", " B", ..."""
    examples: dict[str, list[Example]] = {}
    most_choices = 0
    for split, rows in rows_by_split.items():
        examples[split] = []
        for number, row in enumerate(rows, 1):
            raw_choices = column(row, CHOICES_FIELD, where, number)
            if not isinstance(raw_choices, list) or not 2 <= len(raw_choices) <= len(LETTERS):
                raise MetazoError(
                    f"'{CHOICES_FIELD}' in {where} row {number} must be a list of 2 to {len(LETTERS)} choices "
                    "(every row of a multiple-choice file needs one)"
                )
            choices = [clean_text(str(choice)) for choice in raw_choices]
            question = column(row, text_column, where, number)
            question = "" if question is None else clean_text(str(question))
            if not question:
                continue
            label = choice_index(column(row, label_column, where, number), choices, where, number)
            lettered = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
            examples[split].append(Example(render(template, question + lettered), label, num_choices=len(choices)))
            most_choices = max(most_choices, len(choices))
    return examples, [" " + letter for letter in LETTERS[:most_choices]]


def user_examples(
    rows_by_split: dict[str, list[dict]],
    *,
    text_column: str,
    label_column: str,
    label_words: dict[str, str] | list[str] | None,
    template: str | None,
    where: str,
) -> tuple[dict[str, list[Example]], list[str], str]:
    """Examples per split, label words, and the human-readable template of user rows."""
    all_rows = [row for rows in rows_by_split.values() for row in rows]
    if not all_rows:
        raise MetazoError(f"{where} has no rows; give a file with data")
    template = DEFAULT_USER_TEMPLATE if template is None else template
    if "{text}" not in template:
        raise MetazoError(f"template {template!r} has no {{text}} placeholder; add one, e.g. '{{text}} It was'")
    is_choice_row = [isinstance(row.get(CHOICES_FIELD), list) for row in all_rows]
    if any(is_choice_row):
        # label words are the letters here, so any given label words do not apply
        examples, words = choice_examples(
            rows_by_split, text_column=text_column, label_column=label_column, template=template, where=where
        )
        return examples, words, render(template, "{text}\nA. {choice 1}\nB. {choice 2}...")
    examples, words = text_examples(
        rows_by_split,
        text_column=text_column,
        label_column=label_column,
        label_words=label_words,
        template=template,
        where=where,
    )
    return examples, words, template


def load_hf_rows(spec: str, label_column: str) -> dict[str, list[dict]]:
    """Rows of each split of `hf:NAME` or `hf:NAME:CONFIG`; rows with hidden labels (-1 or None) dropped."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise MetazoError(f"bad dataset spec {spec!r}; write hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None)
    except Exception as error:  # any failure (no network, unknown name, bad config) means the same to the user
        reason = " ".join(str(error).split())[:200]
        raise MetazoError(
            f"could not load dataset '{name}'{f' ({config})' if config else ''} from the Hugging Face Hub ({reason}); "
            "give a local .jsonl or .csv file instead"
        ) from None
    if not isinstance(dataset, dict):  # a DatasetDict is a dict of splits
        dataset = {"train": dataset}
    return {
        split: [row for row in rows if row.get(label_column, "") not in (None, -1)]
        for split, rows in ((split, list(dataset[split])) for split in dataset)
    }
