"""Register the structured-config schema with Hydra's ConfigStore (imported by the CLI).

configs/train.yaml lists `train_schema` first in its defaults, so every YAML group is merged
onto the typed dataclasses of growrun.config.schema and OmegaConf rejects wrong types.
"""
from hydra.core.config_store import ConfigStore

from growrun.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


register()
