"""``python -m pipelines.benchmark loss|augment|train|ingest``: the benchmarks under their documented
command; they live in ``pipelines.bench`` (``pipelines.bench.benchmark`` parses the flags)."""

from pipelines.bench.benchmark import cli

if __name__ == "__main__":
    cli()
