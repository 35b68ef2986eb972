"""The one timing harness of the benchmarks and the GPU check: device sync, the median of interleaved
timed calls, forward+backward closures, and their tables.

Torch only (the GPU check runs where Ray and MLflow are not installed).
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
BENCHMARK = "python -m pipelines.benchmark"  # the owner named in the work folders it makes (sscl.outputs)
Loss2 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z1, z2) -> loss


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU, whose calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Runs ``fn`` once.

    Returns:
        Its result and its duration in ms: CUDA events on a GPU (the kernels' time, not the launch's),
        the wall clock on the CPU.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end)
    began = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - began) * 1e3


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, rounds: int,
              calls: int = 1) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds.

    The functions alternate within every round, so that a drift of the machine (clocks, other load)
    hits all of them alike; every figure of one comparison comes from the same run.

    Args:
        fns: the candidates, by name.
        device: where they run (what to sync and how to time).
        warmup: untimed calls of each before the first round (compiles, caches, the allocator).
        rounds: timed rounds.
        calls: timed calls of each function in a row per round; a round's figure is their median.

    Returns:
        Per name: the median over the rounds, in ms per call.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(statistics.median(timed_ms(fn, device)[1] for _ in range(calls)))
    return {name: statistics.median(ms) for name, ms in samples.items()}


def fwd_bwd(loss: Loss2, z1: torch.Tensor, z2: torch.Tensor) -> Callable[[], None]:
    """One timed unit of a loss: forward and backward on leaves z1, z2, whose gradients are then dropped."""

    def run() -> None:
        loss(z1, z2).backward()
        z1.grad = z2.grad = None

    return run


def unit_rows(n: int, d: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(N, D) random float32 unit rows on ``device``: projections or queue entries to time a loss on."""
    return torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=generator), dim=1)


def free_memory(device: torch.device) -> None:
    """Returns the last case's memory before the next one, so that its peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: a table cell's worth."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def progress(tool: str, message: str, start: float) -> None:
    """A progress line on stderr, flushed: when a run is cut short, its log still says how far it got."""
    print(f"[{tool} {time.monotonic() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tables

Column = tuple[str, str, str]  # (title, alignment and width such as ">8", format of the values such as ".2f")


def header_line(columns: Sequence[Column]) -> str:
    """The titles of ``columns``, each in its column's width."""
    return " ".join(format(title, width) for title, width, _ in columns)


def row_line(columns: Sequence[Column], values: Sequence[object]) -> str:
    """One row under ``header_line(columns)``: each value in its column's width and format."""
    return " ".join(format(value, width + spec) for (_, width, spec), value in zip(columns, values))


@dataclass(frozen=True)
class Row:
    """One line of a report table.

    Attributes:
        section: the part of the run it belongs to.
        case: what was measured, with its sizes.
        figure: the number (None when the case did not run).
        unit: what ``figure`` counts.
        status: "pass"/"FAIL: ..." for correctness, "ok" for measurements, "error: ..." or
            "skipped: ..." when a case did not run.
        extra: further numbers kept in the JSON only.
    """

    section: str
    case: str
    figure: float | None
    unit: str
    status: str
    extra: dict[str, Any] = field(default_factory=dict)


def _format_figure(row: Row) -> str:
    x = row.figure
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if row.unit in ("max abs err",) or (x != 0 and abs(x) < 1e-2):
        return f"{x:.2e}"
    if x.is_integer() and row.unit not in ("ms", "time ratio", "step time ratio"):  # counts
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    """One aligned text table: section, case, figure, unit, status (long statuses are cut).

    Args:
        rows: the report's rows.

    Returns:
        The table, header first, without a trailing newline.
    """
    header = ("section", "case", "figure", "unit", "status")
    cells = [(r.section, r.case, _format_figure(r), r.unit, r.status[:100]) for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = []
    for line in [header, *cells]:
        parts = [text.rjust(w) if i == 2 else text.ljust(w) for i, (text, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (not JSON) as None, in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
