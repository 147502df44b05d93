"""Job configuration: one TOML file plus `key=value` overrides -> `PipelineConfig`.

    [job]         data, store, model, batch_size, actors, feature_dtype, max_reject_fraction, top_k
    [storage]     endpoint_url, region, profile, anon, retry_limit_s   (secrets: AWS env only)
    [ray]         address, runtime_env, progress
    [attribution] damping_ratio
    [attribution.gradient], [attribution.inversion], [attribution.projection],
    [attribution.query]   the fields of ctrak.config's dataclasses

Overrides use dotted keys (`attribution.projection.k=32`); a value is read as a TOML literal
(`[499, 899]`, `true`, `1e-3`, `"x"`), else taken as a plain string (`job.store=s3://b/p`).
Later overrides win. An unknown key is an `UnknownConfigKeyError` listing the valid ones;
credentials in a file or on the command line are refused (they would end up in shell history,
process lists and manifests). Examples: jobs/configs/*.toml. The command-line side
(--config FILE, KEY=VALUE positionals) is `jobs/config.py`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Sequence

from ctrak.errors import ConfigError
from pipeline.config import PipelineConfig
from pipeline.errors import UnknownConfigKeyError

SECRET_KEYS = ("storage.key", "storage.secret", "storage.token")


def parse_override(item: str) -> tuple[str, object]:
    """ "a.b=value" -> ("a.b", value as a TOML literal, else the raw string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value, e.g. job.batch_size=8")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _set(data: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a table")
    node[last] = value


def _check_type(value: object, hint: object, key: str) -> object:
    """value, converted (list -> tuple) and checked against a simple type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _check_type(value, hint, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1, 2]")
        return tuple(_check_type(v, args[0], f"{key}[]") for v in value)
    if origin is typing.Literal:
        return value  # the dataclass names the allowed choices
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    is_bool = isinstance(value, bool)
    if expected and (not isinstance(value, expected) or (is_bool and hint is not bool)):
        raise ConfigError(f"{key}={value!r} must be a {hint.__name__}")
    return float(value) if hint is float else value


def build(cls: type, data: dict, prefix: str = "") -> object:
    """A (nested) config dataclass from a plain dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UnknownConfigKeyError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {names}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def with_overrides(config: object, overrides: Sequence[str], prefix: str = "") -> object:
    """A config dataclass with dotted `key=value` overrides applied (keys relative to it,
    values TOML literals), rebuilt and checked like a config file: unknown keys and wrong
    types raise a ConfigError naming the valid ones."""
    if not overrides:
        return config
    data = dataclasses.asdict(config)
    for item in overrides:
        _set(data, *parse_override(item))
    return build(type(config), data, prefix)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """TOML file (optional) + overrides -> a validated PipelineConfig."""
    data: dict = {}
    if path:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for item in overrides:
        _set(data, *parse_override(item))
    for key in SECRET_KEYS:
        section, name = key.split(".")
        if name in data.get(section, {}):
            raise ConfigError(
                f"{key} must not be given in a config file or on the command line; set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or storage.profile) instead"
            )
    return build(PipelineConfig, data)
