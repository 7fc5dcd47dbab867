"""HF `config.json` (model_type bailing_moe_linear) ⇄ ring_jax `config.model` mapping, both ways.

`config.model` uses the HF field names, so architecture fields copy across 1:1. What HF has and
ring_jax does not model is split in two: fields with a single supported value (checked on read, written on
export) and inert metadata (token ids, auto_map, transformers_version, …) that is carried through unchanged as
"passthrough". ring_jax-only fields (decay_layer_offset, dtype, implementations, …) never enter config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ring_jax.config import REQUIRED, model_fields
from ring_jax.errors import RingJaxError

MODEL_TYPE = "bailing_moe_linear"
ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
# Architecture names engines accept for this checkpoint format.
ARCHITECTURE_ALIASES = frozenset({ARCHITECTURE, "BailingMoeLinearForCausalLM", "BailingMoELinearForCausalLM"})
# The HF remote code release this format is pinned to.
TRANSFORMERS_VERSION = "4.56.1"
AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config",
    "AutoModel": "modeling_bailing_moe_linear_v2.BailingMoeLinearV2Model",
    "AutoModelForCausalLM": "modeling_bailing_moe_linear_v2.BailingMoeLinearV2ForCausalLM",
}


def _json_types(field: dataclasses.Field) -> tuple[type, ...]:
    """The JSON value types config.json may hold for a model field (from its default's type)."""
    if field.name == "rope_scaling":
        return (dict, type(None))
    kind = type(field.default)
    return (int, float) if kind is float else (kind,)


# Fields shared 1:1 by config.json and config.model (the `hf` fields of `ring_jax.config.ModelConfig`):
# name -> (JSON types, value when config.json lacks it: REQUIRED, or None = derived below).
MODEL_FIELDS: dict[str, tuple[tuple[type, ...], Any]] = {
    name: (_json_types(field), field.metadata["when_missing"])
    for name, field in model_fields().items()
    if field.metadata["kind"] == "hf"
}

# Fields whose value ring_jax implements in exactly one way: checked on import, written on export.
SUPPORTED_VALUES: dict[str, Any] = {
    "score_function": "sigmoid",
    "tie_word_embeddings": False,
    "linear_silu": False,
    "use_bias": False,
    "use_qkv_bias": False,
    "hidden_act": "silu",
    "use_rmsnorm": True,
    "router_dtype": "fp32",
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "output_dropout": 0.0,
}

# Inert metadata: carried from the source config.json to the exported one; these values when unknown.
PASSTHROUGH_DEFAULTS: dict[str, Any] = {
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "auto_map": AUTO_MAP,
    "transformers_version": TRANSFORMERS_VERSION,
    "use_cache": True,
    "initializer_range": 0.02,
}
# Fields recomputed on export (identity and dtype), accepted on import.
_REGENERATED = frozenset({"model_type", "architectures", "torch_dtype", "dtype", "_name_or_path"})


class HFConfigError(RingJaxError):
    """A config.json that ring_jax cannot represent; the message names the file and field."""


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_type(name: str, value: Any, types: type | tuple[type, ...], where: str) -> None:
    allowed = types if isinstance(types, tuple) else (types,)
    is_bool_for_number = isinstance(value, bool) and bool not in allowed
    if is_bool_for_number or not isinstance(value, allowed):
        raise HFConfigError(f"{where}: field {name!r} must be {_type_name(types)}, got {value!r}")


def hf_to_model_fields(hf: Mapping[str, Any], where: str = "config.json") -> tuple[dict, dict]:
    """Splits an HF config dict into (config.model fields, passthrough metadata).

    Raises HFConfigError naming `where` and the field for a wrong model_type, a missing required field, a
    wrong type or a value ring_jax does not implement. Unknown fields are logged and carried through.
    """
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise HFConfigError(f"{where}: model_type must be {MODEL_TYPE!r}, got {model_type!r}")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and set(archs) <= ARCHITECTURE_ALIASES):
        raise HFConfigError(f"{where}: architectures must be [{ARCHITECTURE!r}], got {archs!r}")
    for name, supported in SUPPORTED_VALUES.items():
        if name in hf and hf[name] != supported:
            raise HFConfigError(f"{where}: {name}={hf[name]!r} is not supported (ring_jax implements {supported!r})")

    fields: dict[str, Any] = {}
    for name, (types, default) in MODEL_FIELDS.items():
        if name in hf:
            _check_type(name, hf[name], types, where)
            value = hf[name]
            fields[name] = dict(value) if isinstance(value, dict) else value
        elif default == REQUIRED:
            raise HFConfigError(f"{where}: required field {name!r} is missing")
        else:
            fields[name] = default
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if fields["head_dim"] is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]

    known = set(MODEL_FIELDS) | set(SUPPORTED_VALUES) | _REGENERATED
    passthrough = {k: v for k, v in hf.items() if k not in known}
    unknown = sorted(set(passthrough) - set(PASSTHROUGH_DEFAULTS))
    if unknown:
        logging.getLogger(__name__).warning("%s: carrying unrecognised fields through unchanged: %s", where, unknown)
    return fields, passthrough


def read_hf_config(path: str | Path) -> dict:
    """Reads `<dir>/config.json` (or the file itself); errors name the file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config.json not found (an HF checkpoint directory needs one)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise HFConfigError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def apply_hf_config(config_model: Any, hf: Mapping[str, Any], where: str = "config.json") -> dict:
    """Writes the HF fields into `config_model` (a ConfigDict section, in place); returns the passthrough
    dict."""
    fields, passthrough = hf_to_model_fields(hf, where)
    for name, value in fields.items():
        setattr(config_model, name, value)
    return passthrough


def check_exportable(values: Mapping[str, Any]) -> None:
    """Raises HFConfigError for ring_jax-only architectures (no HF equivalent): attention_layout != "hybrid"."""
    layout = values.get("attention_layout", "hybrid")
    if layout != "hybrid":
        raise HFConfigError(
            f"config.model.attention_layout={layout!r} cannot be exported: the HF format has only the hybrid layout"
        )


def model_to_hf_config(config_model: Any, *, torch_dtype: str, passthrough: Mapping[str, Any] | None = None) -> dict:
    """config.model (ConfigDict, ModelConfig dataclass or dict) -> HF config.json dict with every field of
    the released config.json.

    Unsupported values (e.g. tie_word_embeddings=True) raise HFConfigError naming the field.
    """
    # ConfigDict.to_dict / ModelConfig.to_dict give plain values (rope_scaling as a dict in both).
    values = config_model.to_dict() if hasattr(config_model, "to_dict") else dict(config_model)
    check_exportable(values)
    fields = {name: values[name] for name in MODEL_FIELDS}
    for name, value in fields.items():
        supported = SUPPORTED_VALUES.get(name, value)
        if value != supported:
            raise HFConfigError(f"config.model.{name}={value!r} cannot be exported (HF format needs {supported!r})")
    hf: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE]}
    hf.update(fields)
    hf.update({k: v for k, v in SUPPORTED_VALUES.items() if k not in fields})
    hf.update(PASSTHROUGH_DEFAULTS)
    hf.update(passthrough or {})
    hf["torch_dtype"] = torch_dtype
    return hf
