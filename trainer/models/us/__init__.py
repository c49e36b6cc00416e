"""Uninformed Students: an ensemble regresses a pretrained teacher's dense patch descriptors."""
from trainer.models import Method
from trainer.models.us.anomaly_map import error_and_variance, standardised_sum
from trainer.models.us.loss import us_loss
from trainer.models.us.model import DescriptorTeacher, Student, UninformedStudents, USConfig, finalize, prepare

METHOD = Method(name="us", config=USConfig, model=UninformedStudents, loss=us_loss, prepare=prepare,
                finalize=finalize, recipe={"epochs": 20, "optimizer": "adam", "lr": 0.002})

__all__ = ["METHOD", "DescriptorTeacher", "Student", "USConfig", "UninformedStudents", "error_and_variance",
           "standardised_sum", "us_loss"]
