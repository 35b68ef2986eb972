"""SSCL: contrastive self-supervised pretraining with synthetic hard negatives.

The library runs in one plain Python process (CPU or one GPU) and never imports Ray; the Ray Data,
Train and Tune wiring lives in ``pipelines/``.
"""

__version__ = "0.1.0"
