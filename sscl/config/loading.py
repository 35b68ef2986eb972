"""Loading a config: a YAML preset and dotted ``key=value`` overrides, every value checked against
the schema's type and bounds, every problem reported together; and the config as plain data."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from sscl.config.checks import check_loss_keys, cross_check
from sscl.config.schema import Config, ConfigError

# ---------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping in a YAML text gives one key twice."""


class _Loader(yaml.SafeLoader):
    """YAML as people type numbers: ``1e-3``, ``5E-4`` and ``1.0e300`` are floats (YAML 1.2's rule;
    PyYAML's YAML 1.1 reads them as strings), and a key given twice in one mapping is an error, not a
    silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise DuplicateKeyError(None, None, f"found the key {key!r} twice (first {seen[key]}, again on line "
                                        f"{key_node.start_mark.line + 1}); give each key once", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = f"on line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


# Copied per first character: PyYAML's add_implicit_resolver would append to SafeLoader's own lists.
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML with :class:`_Loader`'s rules (numbers as typed, no duplicate keys).

    Raises:
        yaml.YAMLError: for text that is not YAML, or a mapping with a key given twice.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _sections() -> dict[str, type]:
    return typing.get_type_hints(Config)  # section name -> its dataclass


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        problems.append(f"{key}: overrides are section.key=value (e.g. loss.temperature=0.2)")
        return
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        problems.append(f"{parts[0]}: must be a mapping of keys, got {section!r}")
        return
    section[parts[1]] = value


def _parse_override(text: str, problems: list[str], sections: Mapping[str, type] | None = None
                    ) -> tuple[str, Any] | None:
    """``key=value`` -> (key, value); the value is YAML, except for a text key, which takes it as typed
    (``train.run_name=2024`` or ``=1:30`` is that text, not a number). ``sections``: where the key's
    type is looked up (default: the training config's)."""
    if "=" not in text:
        problems.append(f"{text}: overrides are key=value (e.g. loss.temperature=0.2)")
        return None
    key, raw = text.split("=", 1)
    key = key.strip()
    section, _, name = key.partition(".")
    hint = _hints((sections or _sections())[section]).get(name) if section in (sections or _sections()) else None
    if hint is str:
        return key, raw
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_type(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Returns the value coerced to the field's type, or records a problem and returns None."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}={value!r}: must be true or false")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}={value!r}: must be an integer")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        problems.append(f"{key}={value!r}: must be a finite number")
    elif hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        problems.append(f"{key}={value!r}: must be a string" + (f" (quote it: '{value}')" if isinstance(
            value, (int, float)) else ""))
    elif origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}={value!r}: must be a list of {len(items)}")
        elif len(value) != len(items):
            problems.append(f"{key}={list(value)!r}: must have {len(items)} entries, got {len(value)}")
        else:
            checked = tuple(_check_type(f"{key}[{i}]", v, t, problems) for i, (v, t) in enumerate(zip(value, items)))
            return None if any(v is None for v in checked) else checked
    else:  # pragma: no cover - every field uses one of the types above
        raise TypeError(f"unsupported config type {hint} for {key}")
    return None


def _check_range(key: str, value: Any, meta: Mapping[str, Any], problems: list[str]) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        problems.append(f"{key}={value!r}: must be one of {', '.join(map(str, meta['choices']))}")
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, symbol, ok in bounds:
        bound = meta.get(name)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            problems.append(f"{key}={value!r}: must be {symbol} {bound}")
            return


# Keys that changed name: old key -> (new key, old value -> new value; None: the same values).
RENAMED: dict[str, tuple[str, dict[str, str] | None]] = {
    "augment.device": ("placement.views", {"cpu": "ray_data", "gpu": "trainer"}),
    "augment.where": ("placement.views", None),
    "augment.max_tasks": ("placement.max_tasks", None),
    "data.decode": ("placement.decode", None),
}


def _unknown(kind: str, prefix: str, key: str, valid: Iterable[str]) -> str:
    """``loss.temprature: unknown key; did you mean loss.temperature?`` (or the valid names)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid {kind}s: {', '.join(valid)}"
    return f"{prefix}{key}: unknown {kind}{hint}"


def _renamed(old: str, value: Any) -> str:
    new_key, values_map = RENAMED[old]
    if values_map is None:
        return f"{old}: renamed; use {new_key}={value}"
    if str(value) in values_map:
        return f"{old}={value!r}: renamed; use {new_key}={values_map[str(value)]}"
    return f"{old}: renamed to {new_key} ({'; '.join(f'{a} -> {b}' for a, b in values_map.items())})"


def _build_section(name: str, cls: type, values: Mapping[str, Any], problems: list[str]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"{name}.{key!r}: keys must be names (e.g. {name}.{next(iter(fields))}), got {key!r}")
            continue
        if f"{name}.{key}" in RENAMED:
            problems.append(_renamed(f"{name}.{key}", value))
            continue
        if key not in fields:
            problems.append(_unknown("key", f"{name}.", key, fields))
            continue
        coerced = _check_type(f"{name}.{key}", value, hints[key], problems)
        if coerced is not None:
            _check_range(f"{name}.{key}", coerced, fields[key].metadata, problems)
            kwargs[key] = coerced
    return cls(**kwargs)



def read_yaml_file(path: Path, what: str, hint: str = "") -> Any:
    """The YAML content of ``path``.

    Raises:
        FileNotFoundError: naming the missing file (and ``hint``).
        ConfigError: when ``path`` is a folder, not text, or not YAML.
    """
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    if not path.is_file():
        raise ConfigError([f"{what} {path} is a {'folder' if path.is_dir() else 'special file'}; give a YAML file{hint}"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{what} {path} is not a text file (not UTF-8); give a YAML file"]) from None
    try:
        return parse_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError([f"{path}: {err.problem}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML ({err})"]) from None


def _presets_hint(path: Path) -> str:
    """`` (presets in ...: ...)``, with a close match first, for a config path that is not a file."""
    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
    folder = path.parent if path.parent.is_dir() and any(path.parent.glob("*.yaml")) else shipped
    names = sorted(p.name for p in folder.glob("*.yaml"))
    if not names:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return (f"; did you mean {folder / close[0]}?" if close else "") + f" (presets in {folder}: {', '.join(names)})"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Loads a YAML preset (or the defaults), applies ``section.key=value`` overrides, validates.

    Args:
        path: YAML file with sections as top-level keys; None for the defaults.
        overrides: e.g. ``["loss.temperature=0.2", "scaling.num_workers=2"]``; values are YAML.

    Returns:
        The frozen ``Config``.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
        FileNotFoundError: if ``path`` does not exist.
    """
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml_file(path, "config file", hint=_presets_hint(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: must be a mapping of sections, got {type(loaded).__name__}"])
        tree = {k: dict(v) if isinstance(v, dict) else v for k, v in loaded.items()}
    for tool in TOOL_SECTIONS:
        tree.pop(tool, None)  # the tool's own block (load_section)
    preset = tree.get("loss")
    preset_keys = [f"loss.{k}" for k in preset if isinstance(k, str)] if isinstance(preset, dict) else []
    override_keys = []
    for text in overrides:  # in order: a later override of a key wins, as a wrapper script's own arguments should
        parsed = _parse_override(text, problems)
        if parsed and parsed[0].partition(".")[0] in TOOL_SECTIONS:
            problems.append(f"{parsed[0]}: a setting of {TOOL_SECTIONS[parsed[0].partition('.')[0]]}; this command "
                            "does not take it")
        elif parsed:
            _set_dotted(tree, *parsed, problems)
            override_keys.append(parsed[0])
    # Keys the chosen loss must take: the command line's, and the preset's unless the command line picks the loss.
    given = override_keys if "loss.name" in override_keys else [*preset_keys, *override_keys]
    return _from_tree(tree, problems, given)


# Sections a tool owns in the same YAML, with the command that takes them: a preset may hold such a
# block, which ``load_config`` leaves to the tool (``load_section``); the training config has no such keys.
TOOL_SECTIONS = {"tune": "python -m pipelines.tune", "embed": "python -m pipelines.embed"}


def load_section(cls: type, name: str, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """A tool's own section (one of ``TOOL_SECTIONS``): the preset's ``name:`` block, then the
    ``name.key=value`` overrides, every value checked against ``cls``'s types and bounds.

    Raises:
        ConfigError: listing every unknown key, wrong type and out-of-range value.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    loaded = read_yaml_file(Path(path), "config file") if path is not None else None
    block = loaded.get(name, {}) if isinstance(loaded, dict) else {}
    if isinstance(block, dict):
        values.update(block)
    else:
        problems.append(f"{name}: must be a mapping of keys, got {block!r}")
    for text in overrides:
        parsed = _parse_override(text, problems, sections={name: cls})
        if parsed and parsed[0].partition(".")[0] != name:
            problems.append(f"{parsed[0]}: not a {name}.* key")
        elif parsed:
            values[parsed[0].partition(".")[2]] = parsed[1]
    built = _build_section(name, cls, values, problems)
    if problems:
        raise ConfigError(problems)
    return built


def _from_tree(tree: Mapping[str, Any], problems: list[str], given: Iterable[str] = ()) -> Config:
    """Builds and validates a ``Config`` from nested dicts; raises ``ConfigError`` with every problem.
    ``given``: the dotted keys set explicitly, of which the loss's must be keys its family takes."""
    sections = _sections()
    built = {}
    for name, values in tree.items():
        if not isinstance(name, str):
            problems.append(f"{name!r}: section names must be names, one of {', '.join(sections)}")
        elif name not in sections:
            problems.append(_unknown("section", "", name, sections))
        elif not isinstance(values, dict):
            problems.append(f"{name}: must be a mapping of keys, got {values!r}")
        else:
            built[name] = _build_section(name, sections[name], values, problems)
    cfg = Config(**built)
    if not problems:
        cross_check(cfg, problems)
        check_loss_keys(cfg.loss, given, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def apply_overrides(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced (``{"loss.temperature": 0.2}``), validated like ``load_config``.

    Integral floats (a ``quniform`` draw) become ints where the field is an integer.

    Raises:
        ConfigError: listing every unknown key, wrong type, out-of-range value and broken constraint.
    """
    problems: list[str] = []
    tree = to_dict(cfg)
    for key, value in values.items():
        section, _, name = key.partition(".")
        hint = _hints(_sections()[section]).get(name) if section in _sections() else None
        if hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        _set_dotted(tree, key, value, problems)
    return _from_tree(tree, problems, given=values)


def field_info(key: str) -> tuple[Any, Mapping[str, Any]]:
    """The type hint and metadata (help, bounds, choices) of a dotted key.

    Raises:
        KeyError: with a did-you-mean message when the key is not in the schema.
    """
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections:
        raise KeyError(_unknown("section", "", section, sections))
    fields = {f.name: f for f in dataclasses.fields(sections[section])}
    if name not in fields:
        raise KeyError(_unknown("key", f"{section}.", name, fields))
    return _hints(sections[section])[name], fields[name].metadata


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts and lists (for YAML, Ray and MLflow)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in items})


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Rebuilds a ``Config`` from ``to_dict`` output (e.g. inside a Ray worker).

    Raises:
        ConfigError: when the tree is not a valid config (e.g. written by another version).
    """
    return _from_tree(dict(tree), [])


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"loss.temperature": 0.5, ...}`` (MLflow params)."""
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def describe_keys(sections: Mapping[str, type] | None = None) -> str:
    """One line per key of ``sections`` (default: the training config's): dotted name, default and
    help (for ``--help``)."""
    lines = []
    for name, cls in (sections or _sections()).items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
