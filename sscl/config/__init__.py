"""The pretraining configuration: one frozen, typed dataclass tree, loaded from a YAML preset and
overridden by dotted ``key=value`` arguments, validated once, with every problem reported together.

Field names equal the keyword arguments of the functions that consume them (``loss.temperature``
-> ``sscl_loss(temperature=...)``, ``augment.crop_size`` -> ``TwoViewAugment(crop_size=...)``).

- ``schema``: the sections and their fields; ``checks``: constraints between fields;
  ``loading``: presets, overrides and plain-data forms; ``resume``: what a rerun may change.

A sweep's settings (the preset's ``tune:`` block, ``tune.*`` overrides) are not part of a training's
config: ``pipelines.tune`` owns them (``TOOL_SECTIONS``, ``load_section``).
"""

from sscl.config.checks import decoded_size
from sscl.config.loading import (RENAMED, TOOL_SECTIONS, apply_overrides, describe_keys, field_info, flatten, from_dict,
                                 load_config, load_section, parse_yaml, read_yaml_file, to_dict)
from sscl.config.resume import RESUMABLE_KEYS, resume_changes
from sscl.config.schema import (SOURCES, AugmentConfig, Config, ConfigError, DataConfig, LossConfig, ModelConfig,
                                OptimConfig, PlacementConfig, ScalingConfig, TrackingConfig, TrainConfig, setting)

__all__ = ["RENAMED", "RESUMABLE_KEYS", "SOURCES", "TOOL_SECTIONS", "AugmentConfig", "Config", "ConfigError", "DataConfig",
           "LossConfig", "ModelConfig", "OptimConfig", "PlacementConfig", "ScalingConfig", "TrackingConfig", "TrainConfig",
           "apply_overrides", "decoded_size", "describe_keys", "field_info", "flatten", "from_dict", "load_config",
           "load_section", "parse_yaml", "read_yaml_file", "resume_changes", "setting", "to_dict"]
