"""`checkpoint.init_from`: a new run starts from existing weights (step 0, a fresh optimizer), loaded leaf by leaf
straight into the sharded train state (no leaf is ever whole on one device unless its sharding says so).

What `checkpoint.init_from` may name:
- an HF folder (config.json + safetensors, e.g. the released Ring-mini-linear-2.0): tensors streamed onto the mesh;
- a `python -m ring_jax.convert from-hf` output (ring_jax_model.json + Orbax state): restored into the shardings;
- another run's workdir: the parameters and expert biases of its latest complete checkpoint (not its optimizer);
- an HF hub id (`owner/name`) when no such folder exists: downloaded with huggingface_hub (offline: an error
  saying what to download).

The model section follows the weights: the HF fields of config.model (and, from ring_jax checkpoints, the
architecture fields) are the source's, except those listed in `checkpoint.init_from_overrides` (train.py adds the
`--config.model.*` flags it was given); runtime fields (dtypes, kernels, remat) stay this config's. Fields that change
are printed. Shapes that then differ from the source's tensors are an error naming the parameter.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from ring_jax.config import ModelConfig, model_fields
from ring_jax.convert import checkpoint as model_checkpoint
from ring_jax.convert.api import hf_model_config
from ring_jax.convert.safetensors_io import CheckpointError, SafetensorsReader
from ring_jax.convert.transfer import load_state, split_abstract
from ring_jax.errors import RingJaxError
from ring_jax.layers.moe import ExpertBias
from ring_jax.train.checkpoint import is_workdir, restore_params
from ring_jax.train.run_config import read_workdir_config
from ring_jax.train.state import StateFactory, TrainState

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What a hub download fetches: config, weights, tokenizer and chat template, generation config, remote code.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"]


class InitFromError(RingJaxError):
    """A `checkpoint.init_from` that cannot be loaded; the message starts with the field."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """kind: 'hf' (config.json + safetensors), 'ring_jax' (a from-hf output) or 'workdir' (a training run);
    path: its local directory."""

    kind: str
    path: Path

    @functools.cached_property
    def model_config(self) -> ModelConfig:
        """The model the weights were saved for."""
        if self.kind == "hf":
            return hf_model_config(self.path)
        if self.kind == "workdir":
            return ModelConfig.from_config(read_workdir_config(self.path).model)
        return model_checkpoint.checkpoint_config(self.path)

    def model_fields(self) -> dict[str, Any]:
        """The config.model fields that come from the source: HF fields, and ring_jax's architecture fields when the
        source is a ring_jax checkpoint or workdir (HF config.json has none)."""
        kinds = ("hf",) if self.kind == "hf" else ("hf", "architecture")
        values = self.model_config.to_dict()
        return {name: values[name] for name, field in model_fields().items() if field.metadata["kind"] in kinds}


def locate(spec: str) -> InitSource:
    """The source `checkpoint.init_from` names; a hub id (no such local path) is downloaded first."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / model_checkpoint.METADATA_FILE).is_file():
            return InitSource("ring_jax", path)
        if is_workdir(path):
            return InitSource("workdir", path)
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return InitSource("hf", path)
        raise InitFromError(
            f"checkpoint.init_from: {path} is not an HF folder (config.json + *.safetensors), a "
            f"`python -m ring_jax.convert from-hf` output ({model_checkpoint.METADATA_FILE}) or a training workdir "
            f"(checkpoints/ + config.json)"
        )
    if HUB_ID.fullmatch(spec) and not path.exists():
        return InitSource("hf", download(spec))
    raise InitFromError(f"checkpoint.init_from: {spec!r} is not a directory (nor an HF hub id owner/name)")


def download(repo_id: str) -> Path:
    """A hub model's files in the local huggingface_hub cache (downloaded when missing)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitFromError(
            f"checkpoint.init_from: cannot download {repo_id!r} from the Hugging Face hub ({reason}); on a machine "
            f"online run `hf download {repo_id} --local-dir {repo_id.split('/')[1]}`, copy that folder here and set "
            f"checkpoint.init_from to it"
        ) from None


def local_path(spec: str) -> Path | None:
    """The folder `checkpoint.init_from` names on this machine, without downloading: the path itself, or a hub id's
    cached snapshot; None when neither is here."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(spec):
        return None
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(spec, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def keep_overridden_model_fields(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Adds the config.model fields among `overrides` (flat 'section.field' keys, e.g. the --config.* flags of a
    command line) to `checkpoint.init_from_overrides`, so that what the user set wins over the init_from source."""
    kept = _names(config.checkpoint.init_from_overrides)
    kept += [key.removeprefix("model.") for key in overrides if key.startswith("model.")]
    config.checkpoint.init_from_overrides = ",".join(dict.fromkeys(kept))


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, InitSource | None]:
    """(config with config.model taken from the init_from source as the module docstring says, the source); the
    config unchanged and None without `checkpoint.init_from`."""
    spec = config.checkpoint.init_from
    if not spec:
        return config, None
    if not isinstance(spec, str):
        raise InitFromError(f"checkpoint.init_from: must be a path or a hub id, got {spec!r}")
    kept = set(_names(config.checkpoint.init_from_overrides))
    unknown = sorted(kept - set(model_fields()))
    if unknown:
        raise InitFromError(f"checkpoint.init_from_overrides: {unknown[0]!r} is not a config.model field")
    source = locate(spec)
    try:
        fields = source.model_fields()
    except (ValueError, FileNotFoundError) as e:  # the source's config cannot be read (RingJaxError included)
        raise InitFromError(f"checkpoint.init_from: {e}") from None
    config = copy.deepcopy(config)
    changed = []
    for name, value in fields.items():
        if name not in kept and config.model[name] != value:
            changed.append(f"{name} {config.model[name]!r} -> {value!r}")
            config.model[name] = value
    if changed and jax.process_index() == 0:
        print(f"init_from: config.model from {source.path}: {', '.join(changed)}", flush=True)
    check_shapes(source, ModelConfig.from_config(config.model))  # before anything is written
    return config, source


def initial_state(factory: StateFactory, source: InitSource) -> TrainState:
    """A step-0 train state holding the source's parameters and expert biases, in the factory's shardings (the
    factory's model config comes from `resolve`, which checked its shapes against the source)."""
    try:
        if source.kind == "workdir":
            restored = restore_params(source.path, mesh=factory.mesh)
            # The run's own dtypes (model.param_dtype may differ from the source run's); expert biases stay fp32.
            params, expert_bias = jax.tree.map(
                lambda leaf, like: leaf.astype(like.dtype),
                (restored.params, restored.expert_bias),
                (factory.abstract_state.params, factory.abstract_state.expert_bias),
            )
        else:
            if source.kind == "hf":
                model = load_state(SafetensorsReader(source.path), factory.model_config, mesh=factory.mesh)
            else:
                model = model_checkpoint.load_checkpoint(source.path, mesh=factory.mesh, config=factory.model_config)
            _, params, expert_bias, _ = nnx.split(model, nnx.Param, ExpertBias, ...)
    except (CheckpointError, FileNotFoundError) as e:
        raise InitFromError(f"checkpoint.init_from: {e}") from None
    return factory.from_params(params, expert_bias)


def check_shapes(source: InitSource, config: ModelConfig) -> None:
    """Every parameter of `config` exists in the source with the same shape; else InitFromError naming it."""
    mine = {path: v.get_value().shape for path, v in nnx.to_flat_state(split_abstract(config)[1])}
    theirs = {path: v.get_value().shape for path, v in nnx.to_flat_state(split_abstract(source.model_config)[1])}
    describe = lambda shape: "no such parameter" if shape is None else f"shape {list(shape)}"  # noqa: E731
    for path in sorted(set(mine) | set(theirs), key=str):
        if mine.get(path) != theirs.get(path):
            raise InitFromError(f"checkpoint.init_from: parameter {'/'.join(map(str, path))} has "
                                f"{describe(theirs.get(path))} in {source.path} but {describe(mine.get(path))} for "
                                f"this config.model (see checkpoint.init_from_overrides)")  # fmt: skip
