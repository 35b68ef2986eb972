"""Shared command-line handling of ``--config PRESET key=value ...`` for the pipelines."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from pipelines import console
from sscl.config import Config, ConfigError, describe_keys, load_config, load_section, to_dict


class _Once(argparse.Action):
    """An option that may be given once: a second value is an error, not a silent override."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}); give one "
                         "preset and override keys with section.key=value")
        setattr(namespace, self.dest, values)


LOG_DIR = Path("logs")  # the driver's log files: library output and warnings


def parse_config(argv: Sequence[str] | None, *, prog: str, description: str = "") -> Config:
    """Parses ``--config``, ``--print-config``, ``--verbose`` and dotted overrides into a validated ``Config``.

    User errors (unknown keys, wrong types, out-of-range values, a missing preset) print every
    problem and exit with status 2, before any work starts. ``--print-config`` prints the resolved
    config and exits 0.
    """
    return parse_config_and_flags(argv, prog=prog, description=description)[0]


def parse_config_and_flags(argv: Sequence[str] | None, *, prog: str, description: str = "",
                           add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                           tool: tuple[str, type] | None = None) -> tuple[Config, argparse.Namespace]:
    """As :func:`parse_config`, with a command's own flags (added by ``add_flags``) returned too.

    ``tool``: (section name, dataclass) of the command's own settings (``sscl.config.TOOL_SECTIONS``):
    the preset's block and the overrides of that section, loaded into ``args.tool``.
    """
    sections = {tool[0]: tool[1]} if tool else {}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration keys (override with section.key=value):\n" + describe_keys() +
               ("\n" + describe_keys(sections) if tool else ""),
    )
    parser.add_argument("--config", action=_Once, help="YAML preset, e.g. pipelines/configs/quickstart.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the libraries' own output (default: only in the log file)")
    if add_flags is not None:
        add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    own = [o for o in args.overrides if tool and o.partition("=")[0].partition(".")[0] == tool[0]]
    problems = []
    try:
        try:
            cfg = load_config(args.config, [o for o in args.overrides if o not in own])
        except ConfigError as err:
            problems += err.problems
        if tool:
            try:
                args.tool = load_section(tool[1], tool[0], args.config, own)
            except ConfigError as err:
                problems += err.problems
        if problems:
            raise ConfigError(problems)
    except (ConfigError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(config_yaml(cfg, {tool[0]: args.tool} if tool else {}), end="")
        raise SystemExit(0)
    console.setup(args.verbose, LOG_DIR / f"{prog.split('.')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    return cfg, args


def config_yaml(cfg: Config, tools: dict[str, Any] | None = None) -> str:
    """The resolved config (and a tool's own sections, ``tools``: name -> dataclass) as YAML, with any
    credentials in the tracking URI redacted."""
    from sscl.tracking import redact_uri

    tree = to_dict(cfg) | {name: to_dict(section) for name, section in (tools or {}).items()}
    tree["tracking"]["uri"] = redact_uri(tree["tracking"]["uri"])
    return yaml.safe_dump(tree, sort_keys=False)
