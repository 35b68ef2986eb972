"""The ``sscl`` console script: one entry point, a subcommand per pipeline.

    sscl pretrain --config pipelines/configs/quickstart.yaml [key=value ...]   # Ray Train + MLflow
    sscl tune --config pipelines/configs/quickstart.yaml --space tune_spaces/sscl_priors.yaml tune.name=priors
    sscl evaluate --model models:/sscl-digits@champion --config ...
    sscl embed --model models:/sscl-digits@champion --config ... --out features/   # Ray Data -> Parquet
    sscl registry list|show|promote|embed|export ...
    sscl train-local --config pipelines/configs/quickstart.yaml   # == python -m pipelines.train_local (no Ray)
    sscl benchmark loss                  # == python -m pipelines.benchmark
    sscl config --config pipelines/configs/quickstart.yaml loss.temperature=0.2
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable, Sequence


def _train_local(argv: Sequence[str]) -> None:
    from pipelines import train_local

    train_local.cli(argv)


def _benchmark(argv: Sequence[str]) -> None:
    from pipelines.bench import benchmark

    benchmark.main(argv)  # inside sscl's own error boundary


def _config(argv: Sequence[str]) -> None:
    from pipelines.config_cli import config_yaml, parse_config

    print(config_yaml(parse_config(argv, prog="sscl config")), end="")


def _pretrain(argv: Sequence[str]) -> None:
    from pipelines import pretrain

    pretrain.cli(argv)


def _tune(argv: Sequence[str]) -> None:
    from pipelines import tune

    tune.cli(argv)


def _evaluate(argv: Sequence[str]) -> None:
    from pipelines import evaluate

    evaluate.cli(argv)


def _embed(argv: Sequence[str]) -> None:
    from pipelines import embed

    embed.cli(argv)


def _registry(argv: Sequence[str]) -> None:
    from pipelines import registry

    registry.cli(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "pretrain": _pretrain,
    "tune": _tune,
    "evaluate": _evaluate,
    "embed": _embed,
    "registry": _registry,
    "train-local": _train_local,
    "benchmark": _benchmark,
    "config": _config,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatches ``sscl <command> ...``; user errors exit with status 2 and a message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        raise SystemExit(0)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"sscl: unknown command {argv[0]!r}; {hint}commands: {', '.join(COMMANDS)} (sscl --help)",
              file=sys.stderr)
        raise SystemExit(2)
    from pipelines.errors import guarded

    guarded(f"sscl {argv[0]}", lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
