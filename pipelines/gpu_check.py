"""``python -m pipelines.gpu_check``: the GPU check under its documented command (``make gpu-check``);
it lives in ``pipelines.bench.gpu_check``."""

from pipelines.bench.gpu_check import cli

if __name__ == "__main__":
    cli()
