"""get_task: one entry point for built-in tasks, local data files and Hugging Face datasets."""

from __future__ import annotations

from pathlib import Path

from metazo.errors import MetazoError
from metazo.tasks.builtin import BUILTIN_TASKS, BuiltinTask
from metazo.tasks.core import (
    Example,
    Task,
    build_task,
    cap_train,
    deduplicate,
    render,
    shuffled,
    split_sizes,
)
from metazo.tasks.user import FILE_SUFFIXES, label_key, load_hf_rows, read_rows, user_examples

VALIDATION_SPLITS = ("validation", "dev", "valid")


def list_tasks() -> dict[str, str]:
    """Built-in task name -> one-line description (loads no data)."""
    return {name: builtin.description for name, builtin in BUILTIN_TASKS.items()}


def get_task(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_words: dict[str, str] | list[str] | None = None,
    template: str | None = None,
    max_train: int | None = None,
    seed: int = 0,
) -> Task:
    """Load a task with a fixed, seeded train/dev/test split.

    `spec` is a built-in task name (see list_tasks), a path to a .jsonl/.json/.csv/.tsv file,
    or `hf:NAME[:CONFIG]` for a Hugging Face dataset. Pooled data is shuffled with
    random.Random(seed) and split into test = min(1000, 20%), dev = min(500, 10%) and the rest
    train; `max_train` then keeps the first `max_train` training examples. A Hugging Face
    dataset keeps its own validation/test splits and carves only missing ones out of train.
    Texts are whitespace-normalised; empty texts and repeated prompts are dropped (a prompt
    seen with two labels is dropped entirely).

    `label_words` maps each label value (as a string) to its word, or lists the words in
    sorted label order; built-in tasks take the class names (rotten/fresh, ...) as keys.
    `template` must contain "{text}"; the label word is scored right after the rendered prompt.
    """
    if template is not None and "{text}" not in template:
        raise MetazoError(f"template {template!r} has no {{text}} placeholder; add one, e.g. '{{text}} It was'")
    if spec in BUILTIN_TASKS:
        return builtin_task(spec, label_words=label_words, template=template, max_train=max_train, seed=seed)
    user_options = dict(text_column=text_column, label_column=label_column, label_words=label_words, template=template)
    if spec.startswith("hf:"):
        rows_by_split = load_hf_rows(spec, label_column)
        return hf_task(spec, rows_by_split, user_options=user_options, max_train=max_train, seed=seed)
    if spec.lower().endswith(FILE_SUFFIXES):
        path = Path(spec).expanduser()
        examples, words, shown_template = user_examples({"all": read_rows(path)}, where=str(path), **user_options)
        return build_task(
            path.name, examples["all"], label_words=words, template=shown_template, source=str(path),
            seed=seed, max_train=max_train,
        )
    raise MetazoError(
        f"unknown task '{spec}'; built-in tasks: {', '.join(BUILTIN_TASKS)}; "
        f"or give a {'/'.join(FILE_SUFFIXES)} path, or hf:NAME[:CONFIG]"
    )


def builtin_label_words(name: str, builtin: BuiltinTask, label_words: dict[str, str] | list[str] | None) -> list[str]:
    """The task's own words, or replacements keyed by class name or listed in class order."""
    if label_words is None:
        return list(builtin.label_words)
    if isinstance(label_words, dict):
        by_class = {label_key(key): word for key, word in label_words.items()}
        unknown = sorted(set(by_class) - set(builtin.classes))
        missing = [class_name for class_name in builtin.classes if class_name not in by_class]
        if unknown or missing:
            raise MetazoError(
                f"label words for '{name}' must be keyed by its classes {', '.join(builtin.classes)}"
                f"{f'; missing: {missing}' if missing else ''}{f'; unknown: {unknown}' if unknown else ''}"
            )
        return [by_class[class_name] for class_name in builtin.classes]
    if len(label_words) != len(builtin.classes):
        raise MetazoError(
            f"'{name}' has {len(builtin.classes)} classes ({', '.join(builtin.classes)}); give one label word each"
        )
    return list(label_words)


def builtin_task(
    name: str, *, label_words: dict[str, str] | list[str] | None, template: str | None, max_train: int | None, seed: int
) -> Task:
    builtin = BUILTIN_TASKS[name]
    template = builtin.template if template is None else template
    pairs, source = builtin.load()
    examples = [Example(render(template, text), label) for text, label in pairs if text]
    return build_task(
        name, examples, label_words=builtin_label_words(name, builtin, label_words), template=template,
        source=source, seed=seed, max_train=max_train,
    )


def hf_task(
    spec: str, rows_by_split: dict[str, list[dict]], *, user_options: dict, max_train: int | None, seed: int
) -> Task:
    """Use the dataset's own splits; carve a missing dev or test split out of the shuffled train split."""
    examples, words, shown_template = user_examples(rows_by_split, where=spec, **user_options)
    train = shuffled(deduplicate(examples.get("train", [])), seed)
    if not train:
        raise MetazoError(
            f"{spec} has no labelled 'train' split (splits: {', '.join(examples)}); give a local .jsonl or .csv file"
        )
    dev = deduplicate(next((examples[split] for split in VALIDATION_SPLITS if examples.get(split)), []))
    test = deduplicate(examples.get("test", []))
    _, num_dev, num_test = split_sizes(len(train))
    if not test:
        test, train = train[:num_test], train[num_test:]
    if not dev:
        dev, train = train[:num_dev], train[num_dev:]
    return Task(
        name=spec, label_words=words, template=shown_template, train=cap_train(train, max_train),
        dev=dev, test=test, source=f"Hugging Face dataset {spec.removeprefix('hf:')}",
    )
