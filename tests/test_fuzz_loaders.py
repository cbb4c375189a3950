"""Property tests over every loader of a file a user passes in (policies, weights, run checkpoints):
whatever the damage, the loader returns or raises MetazoError, never another exception, a hang or
a huge allocation. Derandomised, so CI runs the same cases every time."""

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny
from metazo.blocks import model_blocks
from metazo.checkpoints import load_tensors, read_weights_info, save_weights
from metazo.errors import MetazoError
from metazo.policy import PerturbationPolicy, PolicyConfig, load_policy
from metazo.resume import read_run_checkpoint, save_run_checkpoint

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One valid file of each kind, small enough that a case takes milliseconds."""
    folder = tmp_path_factory.mktemp("originals")
    policy = PerturbationPolicy(["attn_q", "mlp_up"], PolicyConfig(hidden=4))
    policy_path = policy.save_pretrained(folder / "policy.safetensors", {"tasks": {"rotten-tomatoes": 1.0}})
    model, _ = tiny()
    blocks = [b for b in model_blocks(model) if b.param.numel() < 5000][:4]
    weights_path = save_weights(folder / "weights.safetensors", blocks, {"model": "tiny-llama", "mode": "full"})
    checkpoint_path = save_run_checkpoint(folder, "finetune", 7, {b.name: b.param for b in blocks},
                                          {"step": 7, "optimizer": {"step": 7}}, keep=1)
    return {
        "policy": (policy_path.read_bytes(), load_policy),
        "weights": (weights_path.read_bytes(), lambda p: (read_weights_info(p), load_tensors(p))),
        "checkpoint": (checkpoint_path.read_bytes(), lambda p: read_run_checkpoint(p, "finetune")),
    }


def _load(originals, kind: str, data: bytes, tmp_path: Path) -> None:
    _, loader = originals[kind]
    path = tmp_path / f"fuzzed-{kind}.safetensors"
    path.write_bytes(data)
    try:
        loader(path)
    except MetazoError:
        pass


def _split(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


KINDS = st.sampled_from(["policy", "weights", "checkpoint"])


@FUZZ
@given(kind=KINDS, cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(originals, tmp_path, kind, cut):
    data = originals[kind][0]
    _load(originals, kind, data[: int(len(data) * cut)], tmp_path)


@FUZZ
@given(kind=KINDS, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips(originals, tmp_path, kind, flips):
    data = bytearray(originals[kind][0])
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    _load(originals, kind, bytes(data), tmp_path)


@FUZZ
@given(kind=KINDS, declared=st.integers(0, 2**64 - 1))
def test_huge_or_wrong_declared_header_sizes(originals, tmp_path, kind, declared):
    data = originals[kind][0]
    _load(originals, kind, struct.pack("<Q", declared) + data[8:], tmp_path)


@FUZZ
@given(kind=KINDS, index=st.integers(0, 100),
       dtype=st.sampled_from(["F16", "BF16", "F64", "I64", "BOOL", "U8", "F32", "F4", "", "object"]),
       shape=st.lists(st.integers(-2, 2**40), max_size=4), shift=st.integers(-16, 16))
def test_wrong_dtypes_shapes_and_offsets(originals, tmp_path, kind, index, dtype, shape, shift):
    header, body = _split(originals[kind][0])
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[index % len(names)]]
    entry["dtype"], entry["shape"] = dtype, shape
    entry["data_offsets"][1] += shift
    _load(originals, kind, _join(header, body), tmp_path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=10)


@FUZZ
@given(kind=KINDS, index=st.integers(0, 100), value=st.text(max_size=40) | JSON_VALUES.map(json.dumps))
def test_malformed_metadata(originals, tmp_path, kind, index, value):
    header, body = _split(originals[kind][0])
    metadata = header["__metadata__"]
    keys = sorted(metadata)
    metadata[keys[index % len(keys)]] = value
    _load(originals, kind, _join(header, body), tmp_path)


@FUZZ
@given(kind=KINDS, index=st.integers(0, 100), key=st.text(max_size=12), value=JSON_VALUES)
def test_malformed_json_inside_metadata(originals, tmp_path, kind, index, key, value):
    """Valid JSON of the wrong shape inside a metadata entry: a policy's architecture, a checkpoint's state."""
    header, body = _split(originals[kind][0])
    metadata = header["__metadata__"]
    json_keys = sorted(k for k, v in metadata.items() if v.startswith("{"))
    name = json_keys[index % len(json_keys)]
    document = json.loads(metadata[name])
    inner = sorted(document) or [key]
    document[inner[index % len(inner)] if index % 3 else key] = value
    metadata[name] = json.dumps(document)
    _load(originals, kind, _join(header, body), tmp_path)


def test_the_originals_load(originals, tmp_path):
    """The fuzzing starts from valid files (else every case would fail early for one reason)."""
    for kind, (data, loader) in originals.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data)
        loader(path)


def test_a_huge_declared_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(MetazoError, match="declares a 1099511627776-byte header"):
        load_policy(path)
    path.write_bytes(_join({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, b""))
    with pytest.raises(MetazoError, match="lies outside the file"):
        load_tensors(path)
