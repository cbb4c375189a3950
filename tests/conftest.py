import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub

import pytest
import torch

from metazo.models import load_model

TINY_FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_model("tiny-llama")[1]


def tiny(name: str = "tiny-llama", dtype: str = "float32"):
    """A fresh tiny model (its own weights, so tests may change them) and its tokenizer."""
    torch.manual_seed(0)
    return load_model(name, dtype=dtype, device="cpu")
