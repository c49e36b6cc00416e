"""STFPM: student-teacher feature pyramid matching."""
from trainer.models import Method
from trainer.models.stfpm.anomaly_map import combine_maps, level_maps
from trainer.models.stfpm.loss import feature_distance, stfpm_loss
from trainer.models.stfpm.model import STFPM, STFPMConfig

METHOD = Method(name="stfpm", config=STFPMConfig, model=STFPM, loss=stfpm_loss)

__all__ = ["METHOD", "STFPM", "STFPMConfig", "combine_maps", "feature_distance", "level_maps", "stfpm_loss"]
