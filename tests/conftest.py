import os
import socket

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub

import pytest
import torch

from metazo.models import load_model
from metazo.scoring import Scorer
from metazo.tasks import get_task

TINY_FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_model("tiny-llama")[1]


def tiny(name: str = "tiny-llama", dtype: str = "float32"):
    """A fresh tiny model (its own weights, so tests may change them) and its tokenizer."""
    torch.manual_seed(0)
    return load_model(name, dtype=dtype, device="cpu")


@pytest.fixture(scope="session")
def task():
    """The real rotten-tomatoes task (offline data)."""
    return get_task("rotten-tomatoes")


def scorer_and_batch(model, tokenizer, task, n=8, micro_batch_size=None):
    """A scorer for ``task``'s label words and a batch of its first ``n`` training examples."""
    scorer = Scorer(model, tokenizer, task.label_token_ids(tokenizer), micro_batch_size=micro_batch_size)
    return scorer, scorer.encode(task.train[:n])


def free_port() -> int:
    """A free local TCP port for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
