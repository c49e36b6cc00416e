"""The words every service uses for the same things: one definition each.

Methods and precisions name a model package (`shared.package`), verdicts a
result and model states an agent's update (`shared.messages`), review labels
what an operator decided about a result (the hub stores them, the trainer
learns from them). The hub's database constrains its columns to these tuples.
"""
from __future__ import annotations

# the anomaly detection methods a package may carry (trainer.models has one folder each)
METHODS = ("stfpm", "rd", "us", "patchcore")
# a package's numeric precision (int4 weights run as int8 storage)
PRECISIONS = ("fp32", "fp16", "int8", "mixed")

# a result's verdict: the image score against its class's threshold
VERDICT_OK = "ok"
VERDICT_ANOMALY = "anomaly"
VERDICTS = (VERDICT_OK, VERDICT_ANOMALY)

# an agent's model update, as it reports on model/state
MODEL_IDLE = "idle"
MODEL_DOWNLOADING = "downloading"
MODEL_VERIFYING = "verifying"
MODEL_BUILDING = "building"
MODEL_TESTING = "testing"
MODEL_ACTIVE = "active"
MODEL_FAILED = "failed"
MODEL_ROLLED_BACK = "rolled_back"
MODEL_UPDATING = (MODEL_DOWNLOADING, MODEL_VERIFYING, MODEL_BUILDING, MODEL_TESTING)   # on the way, in order
MODEL_STATES = (MODEL_IDLE, *MODEL_UPDATING, MODEL_ACTIVE, MODEL_FAILED, MODEL_ROLLED_BACK)

# what an operator's review says a result was
REVIEW_DEFECT = "defect"
REVIEW_FALSE_ALARM = "false_alarm"
REVIEW_LABELS = (REVIEW_DEFECT, REVIEW_FALSE_ALARM)
