"""Loading configurations: schema defaults <- YAML file (ours or Detectron2's) <- ``key=value`` overrides.

Our YAML files use the lower-case schema of :mod:`cutler.config.schema` and may inherit with
``_base_: relative/path.yaml`` (or a list of paths; later ones win, the file itself wins over all).
A file whose top-level keys are UPPER_CASE (or that has ``_BASE_``) is a CutLER/Detectron2 config and
goes through :func:`cutler.config.detectron2_yaml.import_detectron2_yaml`.

Every key is checked against the schema: an unknown key raises :class:`ConfigKeyError` naming the
key, the file it came from and its closest valid neighbour.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .schema import CutlerConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA_NAME = "cutler_schema"

ConfigStore.instance().store(name=SCHEMA_NAME, node=CutlerConfig)


class ConfigKeyError(KeyError):
    """An unknown or unsupported configuration key; the message names it and suggests a neighbour."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}.{key}" if prefix else str(key)
            keys.append(full)
            keys.extend(_schema_keys(node._get_node(key), full))
    return keys


def suggest_key(bad_key: str, valid_keys: Iterable[str]) -> Optional[str]:
    """The valid key closest to ``bad_key`` (compared on full dotted paths and on the last part)."""
    valid = list(valid_keys)
    best = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.6)
    if best:
        return best[0]
    leaf = bad_key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
    best = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[best[0]] if best else None


def _unknown_key_error(key: str, source: str, schema: DictConfig) -> ConfigKeyError:
    hint = suggest_key(key, _schema_keys(schema))
    msg = f"unknown config key '{key}' (from {source})"
    if hint:
        msg += f"; did you mean '{hint}'?"
    return ConfigKeyError(msg)


def check_keys(data: Mapping, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigKeyError` for the first key of ``data`` that the schema lacks."""
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            raise _unknown_key_error(full, source, OmegaConf.structured(CutlerConfig))
        child = schema._get_node(key)
        if isinstance(value, Mapping) and isinstance(child, DictConfig):
            check_keys(value, child, source, full)


def _is_detectron2_style(data: Mapping) -> bool:
    return "_BASE_" in data or any(isinstance(k, str) and k.isupper() for k in data)


def read_yaml_with_bases(path: os.PathLike | str, _seen: Optional[set] = None) -> dict:
    """Read one of our YAML files, resolving ``_base_`` inheritance; returns a plain nested dict."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    seen = set() if _seen is None else _seen
    if path in seen:
        raise ValueError(f"config inheritance cycle through {path}")
    seen = seen | {path}
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse YAML config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    if _is_detectron2_style(data):
        from .detectron2_yaml import import_detectron2_yaml

        return import_detectron2_yaml(path)
    bases = data.pop("_base_", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, read_yaml_with_bases(path.parent / base, seen))
    merged = OmegaConf.merge(merged, data)
    return OmegaConf.to_container(merged)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply Hydra-syntax ``key=value`` overrides in place (``+key`` / ``~key`` are refused: the schema is closed)."""
    if not overrides:
        return
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_add() or ov.is_delete() or ov.is_force_add():
            raise ConfigKeyError(f"override '{ov.input_line}': adding or deleting keys is not allowed")
        if ov.is_sweep_override():
            raise ValueError(f"override '{ov.input_line}': sweeps are not supported here")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not _has_key(cfg, key):
            raise _unknown_key_error(key, f"override '{ov.input_line}'", cfg)
        OmegaConf.update(cfg, key, ov.value(), merge=False)


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or a name relative to the shipped ``configs/`` folder (``.yaml`` optional)."""
    candidates = [Path(name_or_path), CONFIGS_DIR / name_or_path, CONFIGS_DIR / f"{name_or_path}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"config file '{name_or_path}' not found (looked at {', '.join(str(c) for c in candidates)})"
    )


def load_config(config_file: Optional[str] = None, overrides: Sequence[str] = (), freeze: bool = True) -> DictConfig:
    """Build the full configuration.

    Args:
        config_file: our YAML, a CutLER/Detectron2 YAML, or a name under ``configs/``; None = schema defaults.
        overrides: Hydra-style ``a.b=value`` strings applied last.
        freeze: make the result read-only.

    Returns:
        A struct-mode ``DictConfig`` with every key of :class:`CutlerConfig`, interpolations resolved.
    """
    cfg = OmegaConf.structured(CutlerConfig)
    if config_file:
        path = resolve_config_path(config_file)
        data = read_yaml_with_bases(path)
        check_keys(data, cfg, source=str(path))
        try:
            cfg = OmegaConf.merge(cfg, data)
        except Exception as e:  # type errors from the schema: name the file
            raise ValueError(f"invalid value in {path}: {e}") from e
    apply_overrides(cfg, overrides)
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    if freeze:
        OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: os.PathLike | str) -> None:
    """Write the resolved config as YAML (atomically), e.g. into a run's output folder."""
    from cutler.utils.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
