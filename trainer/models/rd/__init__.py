"""Reverse Distillation: a decoder rebuilds a frozen encoder's features from a one-class embedding."""
from trainer.models import Method
from trainer.models.rd.anomaly_map import level_maps, sum_maps
from trainer.models.rd.loss import cosine_distance, rd_loss
from trainer.models.rd.model import RDConfig, ReverseDistillation, prepare

# the RD paper's Adam (lr 0.005, beta1 0.5)
METHOD = Method(name="rd", config=RDConfig, model=ReverseDistillation, loss=rd_loss, prepare=prepare,
                recipe={"epochs": 20, "optimizer": "adam", "lr": 0.005, "momentum": 0.5})

__all__ = ["METHOD", "RDConfig", "ReverseDistillation", "cosine_distance", "level_maps", "rd_loss", "sum_maps"]
