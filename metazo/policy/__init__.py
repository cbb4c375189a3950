"""The learned perturbation policy: features (what it sees), network (PertNN), io (policy files)."""

from metazo.policy.features import FEATURE_SETS, RunState, block_features, weight_statistics
from metazo.policy.io import SCHEMA_VERSION, format_card, load_policy, read_policy_metadata, save_policy
from metazo.policy.network import PerturbationPolicy, PolicyConfig, group_of, normalizer

__all__ = [
    "FEATURE_SETS", "RunState", "block_features", "weight_statistics", "SCHEMA_VERSION", "format_card",
    "load_policy", "read_policy_metadata", "save_policy", "PerturbationPolicy", "PolicyConfig", "group_of",
    "normalizer",
]
