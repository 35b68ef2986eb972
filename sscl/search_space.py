"""Search spaces as data: YAML keyed by the dotted keys of the pretraining config.

One entry per key, checked against the config schema before anything runs::

    loss.temperature: {loguniform: [0.05, 1.0]}   # low > 0
    loss.beta: {uniform: [0.0, 3.0]}
    optim.warmup_epochs: {quniform: [0, 10, 1]}    # [low, high, q]; integer keys get integers
    loss.mode: {choice: [mix, copy]}               # drawn at random
    train.seed: {grid: [0, 1, 2]}                  # every value (times tune.num_samples)
    loss.name: sscl                                # a plain value: fixed for the whole sweep

A key without a dot names a *bundle*: a ``grid`` or ``choice`` over mappings of dotted keys that are
set together, e.g. a loss with its own priors::

    loss:
      grid:
        - {loss.name: dcl, loss.tau_plus: 0.1}
        - {loss.name: hcl, loss.tau_plus: 0.1, loss.beta: 1.0}

Every bound and value is validated as the config would validate it, with the preset the sweep
starts from and the space's fixed values (so ``loss.n_hard`` is checked against that preset's batch
size, or against its queue when the space fixes ``model.method: moco``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping


from sscl.config import Config, ConfigError, apply_overrides, field_info, read_yaml_file

__all__ = ["DISTRIBUTIONS", "Param", "SearchSpace", "load_space", "parse_space", "trial_values"]

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "choice", "grid")
# Keys a trial must not change: they say where data, checkpoints and runs live, how the sweep
# itself runs, or the budget ASHA schedules against.
NOT_SEARCHABLE = {
    "tune": "the sweep's own settings, not a trial's",
    "tracking": "where results are recorded",
    "scaling": "the resources each trial reserves",
    "data.source": "the dataset", "data.root": "the dataset", "data.download": "the dataset",
    "data.image_column": "the dataset", "data.label_column": "the dataset", "data.image_size": "the dataset",
    "data.test_fraction": "the dataset", "data.skip_corrupt": "the dataset",
    "train.epochs": "the budget ASHA schedules against", "train.run_name": "set per trial",
    "train.storage_path": "set per sweep", "train.max_failures": "fault handling",
}


@dataclass(frozen=True)
class Param:
    """One entry: ``key`` (dotted, or a bundle name), ``kind`` (a distribution or ``fixed``), ``args``
    (bounds, values, or for bundles a tuple of dotted-key mappings)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    @property
    def is_bundle(self) -> bool:
        return "." not in self.key


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; ``source`` is the file it came from."""

    params: tuple[Param, ...]
    source: str = "<space>"

    @property
    def searched_keys(self) -> list[str]:
        """Dotted keys a trial may set, bundle members included, in file order."""
        keys: list[str] = []
        for p in self.params:
            for k in [k for bundle in p.args for k in bundle] if p.is_bundle else [p.key]:
                if k not in keys:
                    keys.append(k)
        return keys

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params)

    @property
    def has_bundles(self) -> bool:
        return any(p.is_bundle for p in self.params)

    def to_dict(self) -> dict[str, Any]:
        """The space in its YAML form (for logging next to the sweep)."""
        return {p.key: (p.args[0] if p.kind == "fixed" else {p.kind: list(p.args)}) for p in self.params}


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Reads and validates a YAML search space against ``base`` (the sweep's starting config).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ConfigError: every problem, each naming the space key.
    """
    path = Path(path)
    shipped = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))
    tree = read_yaml_file(path, "search space", hint=f" (shipped spaces in tune_spaces/: {', '.join(shipped)})")
    return parse_space(tree, base, source=str(path))


def parse_space(tree: Any, base: Config, *, source: str = "<space>") -> SearchSpace:
    """Validates a space given as a mapping (the YAML's content); see ``load_space``."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError([f"{source}: must be a non-empty mapping of dotted config keys to distributions"])
    problems: list[str] = []
    params = []
    for key, spec in tree.items():
        before = len(problems)
        param = _parse_entry(str(key), spec, problems)
        if param is not None and len(problems) == before:
            params.append(param)
    # The searched values are checked on the preset with the space's fixed values applied (e.g. a
    # moco space's n_hard against the queue, not the preset's batch); the fixed ones on the preset.
    fixed = {p.key: p.args[0] for p in params if p.kind == "fixed"}
    try:
        start = apply_overrides(base, fixed)
    except ConfigError:
        start = base  # the fixed values' own problems are reported below
    for param in params:
        _check_against(base if param.kind == "fixed" else start, param, problems)
    seen: dict[str, str] = {}
    for p in params:
        for k in ([k for bundle in p.args for k in bundle] if p.is_bundle else [p.key]):
            if k in seen and seen[k] != p.key:
                problems.append(f"{p.key}: sets {k}, which {seen[k]} sets too")
            seen.setdefault(k, p.key)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return SearchSpace(tuple(params), source)


def _searchable(key: str, problems: list[str]) -> bool:
    reason = NOT_SEARCHABLE.get(key) or NOT_SEARCHABLE.get(key.partition(".")[0])
    if reason:
        problems.append(f"{key}: cannot be searched ({reason}); set it on the command line instead")
        return False
    try:
        field_info(key)
    except KeyError as err:
        problems.append(err.args[0])
        return False
    return True


def _parse_entry(key: str, spec: Any, problems: list[str]) -> Param | None:
    if "." not in key:
        return _parse_bundle(key, spec, problems)
    if not _searchable(key, problems):
        return None
    if not isinstance(spec, dict):
        return Param(key, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        problems.append(f"{key}: {spec!r} is not a distribution; write {{name: args}} with name one of "
                        f"{', '.join(DISTRIBUTIONS)}")
        return None
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        problems.append(f"{key}: {kind} takes a non-empty list, got {args!r}")
        return None
    if kind in ("choice", "grid"):
        return Param(key, kind, tuple(args))
    hint, _ = field_info(key)
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    expected = 3 if kind == "quniform" else 2
    if len(args) != expected or not numbers:
        shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
        problems.append(f"{key}: {kind} takes {shape} (numbers), got {args!r}")
        return None
    low, high = args[0], args[1]
    if hint not in (int, float):
        problems.append(f"{key}: {kind} needs a numeric key; use choice or grid")
        return None
    if hint is int and kind != "quniform":
        problems.append(f"{key}: an integer key; use quniform [low, high, 1], choice or grid instead of {kind}")
        return None
    if not low < high:
        problems.append(f"{key}: {kind} needs low < high, got {args!r}")
        return None
    if kind == "loguniform" and low <= 0:
        problems.append(f"{key}: loguniform needs low > 0, got {low!r}")
        return None
    if kind == "quniform":
        q = args[2]
        if q <= 0 or (hint is int and not (float(q).is_integer() and float(low).is_integer()
                                          and float(high).is_integer())):
            problems.append(f"{key}: quniform needs q > 0 (and integer low, high, q for an integer key), got {args!r}")
            return None
    return Param(key, kind, tuple(args))


def _parse_bundle(key: str, spec: Any, problems: list[str]) -> Param | None:
    usage = (f"{key}: a key without a dot is a bundle: {{grid: [...]}} or {{choice: [...]}} of mappings of dotted "
             "keys (e.g. {loss.name: dcl, loss.tau_plus: 0.1}); or did you mean a section.key?")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("grid", "choice")):
        problems.append(usage)
        return None
    kind, bundles = next(iter(spec.items()))
    if not isinstance(bundles, list) or not bundles or not all(isinstance(b, dict) and b for b in bundles):
        problems.append(usage)
        return None
    ok = all(_searchable(str(k), problems) for b in bundles for k in b)
    return Param(key, kind, tuple({str(k): v for k, v in b.items()} for b in bundles)) if ok else None


def _candidates(param: Param) -> Iterator[dict[str, Any]]:
    """Overrides covering every value a parameter can take (bounds for the continuous ones)."""
    if param.is_bundle:
        yield from param.args
    elif param.kind == "fixed":
        yield {param.key: param.args[0]}
    elif param.kind in ("choice", "grid"):
        for value in param.args:
            yield {param.key: value}
    else:
        for bound in param.args[:2]:
            yield {param.key: bound}


def _check_against(base: Config, param: Param, problems: list[str]) -> None:
    for overrides in _candidates(param):
        try:
            apply_overrides(base, overrides)
        except ConfigError as err:
            label = param.key if param.is_bundle or param.kind == "fixed" else f"{param.key} ({param.kind})"
            problems += [f"{label}: {p}" for p in err.problems if f"{label}: {p}" not in problems]


def trial_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled ``{key: value}`` with bundles expanded into their dotted keys."""
    values: dict[str, Any] = {}
    for key, value in params.items():
        if "." in key:
            values[key] = value
        else:
            values.update(value)
    return values
