"""What a rerun under an existing ``train.run_name`` may change."""

from __future__ import annotations

from typing import Mapping

from sscl.config.loading import flatten
from sscl.config.schema import Config


# Keys a rerun under the same ``train.run_name`` may change: how the run is executed, logged and how
# long it goes on, not what it computes. ``train.epochs`` may only grow (the cosine is stretched from
# the resumed step on). Every other key must keep its recorded value.
RESUMABLE_KEYS = ("train.epochs", "train.max_failures", "train.checkpoint_every", "train.knn_every",
                  "data.prefetch_batches", "data.eval_batch_size", "placement.decode", "placement.views",
                  "placement.max_tasks",
                  "scaling.cpus_per_worker",
                  "tracking.uri", "tracking.register", "tracking.model_name")


def resume_changes(recorded: Mapping[str, str], cfg: Config, *, trained_epochs: int = 0
                   ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """How ``cfg`` differs from a run's ``recorded`` values (MLflow params: text), split into the
    changes a resume may make and those it may not.

    Args:
        recorded: the values the run was started (or last resumed) with, by dotted key; keys it lacks
            (added since) are not compared.
        trained_epochs: epochs the run has trained; fewer ``train.epochs`` is refused. With none trained
            (a run that failed before its first epoch), every change is allowed.

    Returns:
        ``(allowed, refused)``: key -> (recorded, new) as text.
    """
    from sscl.tracking import redact_uri

    allowed, refused = {}, {}
    for key, value in flatten(cfg).items():
        if key not in recorded:
            continue
        new = redact_uri(str(value)) if key == "tracking.uri" else str(value)
        if new == recorded[key]:
            continue
        shrinks = key == "train.epochs" and int(value) < max(trained_epochs, 1)
        free = trained_epochs == 0  # nothing trained with the recorded values yet: a change is a correction
        (allowed if free or (key in RESUMABLE_KEYS and not shrinks) else refused)[key] = (recorded[key], new)
    return allowed, refused
