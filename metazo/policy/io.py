"""Policy files: safetensors tensors plus a JSON card in the metadata. Loading never unpickles.

A policy file holds four tensors (w1, b1, w2, b2: the stacked per-group networks) and three metadata
entries: ``format`` ("metazo-policy"), ``schema_version`` and ``policy`` (architecture: feature set and
feature names, sharing, groups, widths), plus ``card`` (source model, training settings and tasks,
metrics, metazo version), the policy's model card. Everything is checked on load before a tensor is
used (``metazo.checkpoints.safetensors_header``, and the checksum the file carries): a file that is
not safetensors, truncated, bit-flipped, from a newer schema, for unknown features, or with
tensors of the wrong shape, dtype or values is a MetazoError that says which.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from metazo import __version__
from metazo.checkpoints import checked_schema_version, read_checked_tensors, safetensors_header, write_safetensors_atomic
from metazo.errors import MetazoError
from metazo.policy.features import FEATURE_SETS
from metazo.policy.network import PerturbationPolicy, PolicyConfig

FORMAT = "metazo-policy"
SCHEMA_VERSION = 1
TENSORS = ("w1", "b1", "w2", "b2")


def save_policy(policy: PerturbationPolicy, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``policy`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MetazoError(f"policy files end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {**(card or {}), "metazo_version": __version__,
            "saved": card.get("saved") if card and card.get("saved") else time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    architecture = {**policy.config.to_dict(), "feature_names": list(policy.config.feature_names),
                    "groups": list(policy.groups)}
    metadata = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION),
                "policy": json.dumps(architecture, sort_keys=True), "card": json.dumps(card, sort_keys=True, default=str)}
    tensors = {name: getattr(policy, name).detach().float().cpu().contiguous() for name in TENSORS}
    write_safetensors_atomic(path, tensors, metadata)
    policy.card = card
    return path


def read_policy_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture, card) of a policy file, validated, without reading its tensors."""
    path = _existing(path)
    metadata = safetensors_header(path).get("__metadata__", {})
    checked_schema_version(path, metadata, FORMAT, SCHEMA_VERSION, "policy")
    architecture = _json(path, metadata, "policy")
    card = _json(path, metadata, "card")
    return _check_architecture(path, architecture), card


def load_policy(path: str | Path) -> PerturbationPolicy:
    """The policy in ``path``, checked (see the module docstring)."""
    path = _existing(path)
    architecture, card = read_policy_metadata(path)
    tensors, _ = read_checked_tensors(path)
    config = PolicyConfig(**{k: architecture[k] for k in ("features", "sharing", "hidden", "sigma_activation", "log_sigma_bound")})
    policy = PerturbationPolicy(architecture["groups"], config)
    extra = sorted(set(tensors) - set(TENSORS))
    missing = [name for name in TENSORS if name not in tensors]
    if missing or extra:
        raise MetazoError(f"{path}: policy tensors {missing and 'missing ' + ', '.join(missing)}"
                          f"{' ' if missing and extra else ''}{extra and 'unexpected ' + ', '.join(extra)}")
    with torch.no_grad():
        for name in TENSORS:
            expected, tensor = getattr(policy, name), tensors[name]
            if tuple(tensor.shape) != tuple(expected.shape):
                raise MetazoError(f"{path}: policy tensor '{name}' has shape {tuple(tensor.shape)}, "
                                  f"its architecture needs {tuple(expected.shape)}")
            if tensor.dtype != torch.float32:
                raise MetazoError(f"{path}: policy tensor '{name}' is {tensor.dtype}, expected float32")
            if not torch.isfinite(tensor).all():
                raise MetazoError(f"{path}: policy tensor '{name}' holds NaN or infinite values")
            expected.copy_(tensor)
    policy.card = card
    return policy


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetazoError(f"no policy file at {path}")
    return path


def _json(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise MetazoError(f"{path}: policy metadata has no '{key}' entry") from None
    except (json.JSONDecodeError, RecursionError):
        raise MetazoError(f"{path}: policy metadata '{key}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise MetazoError(f"{path}: policy metadata '{key}' is not a JSON object")
    return value


def _check_architecture(path: Path, arch: dict[str, Any]) -> dict[str, Any]:
    def bad(message: str) -> MetazoError:
        return MetazoError(f"{path}: {message}")

    features = arch.get("features")
    if features not in FEATURE_SETS:
        raise bad(f"unknown feature set {features!r} (this metazo knows {', '.join(FEATURE_SETS)})")
    if arch.get("feature_names") != list(FEATURE_SETS[features]):
        raise bad(f"feature names {arch.get('feature_names')!r} differ from this metazo's '{features}' set "
                  f"{list(FEATURE_SETS[features])}")
    groups = arch.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise bad("policy groups must be a non-empty list of names")
    hidden = arch.get("hidden")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= 4096:
        raise bad(f"policy hidden width {hidden!r} is not an integer in 1..4096")
    if len(groups) * len(FEATURE_SETS[features]) * hidden > 1 << 26:
        raise bad(f"a policy of {len(groups)} groups x {hidden} hidden units is implausibly large")
    bound = arch.get("log_sigma_bound")
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound) or bound <= 0:
        raise bad(f"log_sigma_bound {bound!r} is not a positive number")
    try:
        PolicyConfig(features, arch.get("sharing"), hidden, arch.get("sigma_activation"), float(bound)).validate()
    except MetazoError as error:
        raise bad(str(error)) from None
    return arch


def format_card(path: str | Path) -> str:
    """The human-readable card of a policy file (``metazo policy show``)."""
    architecture, card = read_policy_metadata(path)
    lines = [f"policy: {path}", f"schema version {SCHEMA_VERSION}, written by metazo {card.get('metazo_version', '?')}"
             f"{', ' + card['saved'] if card.get('saved') else ''}"]
    lines.append(f"architecture: one network per {architecture['sharing']} ({len(architecture['groups'])}: "
                 f"{', '.join(architecture['groups'][:12])}{' ...' if len(architecture['groups']) > 12 else ''}), "
                 f"hidden {architecture['hidden']}, sigma {architecture['sigma_activation']}"
                 f"{' (log bound ' + str(architecture['log_sigma_bound']) + ')' if architecture['sigma_activation'] == 'exp' else ''}")
    lines.append(f"features ({architecture['features']}): {', '.join(architecture['feature_names'])}")
    for key in ("source_model", "tasks", "training", "metrics", "sigma_on_source", "heldout"):
        if key in card:
            lines.append(f"{key.replace('_', ' ')}:")
            lines.extend(_indented(card[key]))
    other = sorted(set(card) - {"source_model", "tasks", "training", "metrics", "sigma_on_source", "heldout",
                                "metazo_version", "saved"})
    for key in other:
        lines.append(f"{key}: {json.dumps(card[key], default=str)}")
    return "\n".join(lines)


def _indented(value: Any, prefix: str = "  ") -> list[str]:
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item and any(isinstance(v, (dict, list)) for v in (item.values() if isinstance(item, dict) else item)):
                lines.append(f"{prefix}{key}:")
                lines.extend(_indented(item, prefix + "  "))
            else:
                lines.append(f"{prefix}{key}: {_short(item)}")
        return lines
    if isinstance(value, list):
        return [f"{prefix}- {_short(item)}" if not isinstance(item, (dict, list)) else f"{prefix}- {json.dumps(item, default=str)}" for item in value]
    return [f"{prefix}{_short(value)}"]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
