"""STFPM: student-teacher feature pyramid matching."""
from trainer.models import Method
from trainer.models.stfpm.anomaly_map import combine_maps, level_maps
from trainer.models.stfpm.loss import feature_distance, hardest_mean, stfpm_loss
from trainer.models.stfpm.model import STFPM, StemStudent, STFPMConfig, prepare

# Adam with a short warm-up and cosine decay: the stem student converges in ~10 epochs on the real
# development sets (docs/results.md); SGD at the paper's 0.4 diverges with standardised targets
METHOD = Method(name="stfpm", config=STFPMConfig, model=STFPM, loss=stfpm_loss, prepare=prepare,
                recipe={"epochs": 10, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5})

__all__ = ["METHOD", "STFPM", "STFPMConfig", "StemStudent", "combine_maps", "feature_distance", "hardest_mean",
           "level_maps", "stfpm_loss"]
