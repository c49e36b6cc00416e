"""Reduced-precision variants of the inference graph and the report that compares them.

    fp32       the exported graph as `trainer.export` writes it (ONNX Runtime FP32 baseline)
    fp32-opt   the same in FP32 after this package's exact graph rewrites (graph.py)
    fp16       FP16 networks, sensitive ops in FP32 (fp16.py)
    ptq:C[:O]  static INT8, QDQ, per-channel weights; calibration C (calibration.py), observer O (ptq.py)
    qat        INT8 by quantisation-aware fine-tuning with the method's loss (qat.py)
    mixed[:N]  INT8 with the N most sensitive layers kept FP32 (mixed.py)
    int4       4-bit Conv weights, 8-bit activations: an accuracy experiment (int4.py)

`kdfleet quantize` (cli.py) builds the requested variants and writes the
report (report.py). Heavy dependencies load inside the modules that use them.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("fp32", "fp32-opt", "fp16", "ptq", "qat", "mixed", "int4")
PRECISION = {"fp32": "fp32", "fp32-opt": "fp32", "fp16": "fp16", "ptq": "int8", "qat": "int8", "mixed": "mixed",
             "int4": "int8"}   # the model package's `precision` field (int4 runs as int8 storage)
DEFAULT_RECIPES = "fp32,fp16,ptq:train,ptq:random-normal,ptq:holdout-normal,ptq:mixed,qat"
OBSERVERS = ("minmax", "percentile", "entropy")   # how PTQ sets an activation's range from the calibration frames
# percentile (99.999 %): on the real sets it lost 0.005-0.006 image AUROC where min-max lost 0.015-0.017 (STFPM and
# PatchCore, random-normal calibration; docs/results.md), on the synthetic set 0.007 against 0.010: min-max lets
# the few extreme activations of a calibration set coarsen every other value's step
DEFAULT_OBSERVER = "percentile"
TARGETS = ("cpu", "tensorrt")   # cpu: uint8 activations for ONNX Runtime; tensorrt: int8 symmetric, zero point 0


@dataclass(frozen=True, slots=True)
class Recipe:
    """One variant to build: its kind and, where it applies, calibration, observer and kept layers."""

    kind: str
    calibration: str | None = None
    observer: str | None = None
    keep: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "ptq":
            return f"ptq:{self.calibration}" + (f":{self.observer}" if self.observer else "")
        if self.kind == "mixed":
            return f"mixed:{self.keep}" if self.keep is not None else "mixed"
        return self.kind

    @property
    def precision(self) -> str:
        return PRECISION[self.kind]


def parse_recipes(text: str) -> list[Recipe]:
    """'fp32,ptq:train:entropy,mixed:4' -> recipes, validated, duplicates dropped, order kept."""
    from trainer.quantize.calibration import STRATEGIES

    out: list[Recipe] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        kind, *args = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown recipe {item!r}; kinds: {', '.join(KINDS)}")
        if kind == "ptq":
            if not args or args[0] not in STRATEGIES or len(args) > 2 or (len(args) == 2 and args[1] not in OBSERVERS):
                raise ValueError(f"recipe {item!r}: use ptq:<{'|'.join(STRATEGIES)}>[:<{'|'.join(OBSERVERS)}>]")
            recipe = Recipe("ptq", args[0], args[1] if len(args) == 2 else None)
        elif kind == "mixed":
            if len(args) > 1 or (args and not args[0].isdigit()):
                raise ValueError(f"recipe {item!r}: use mixed or mixed:<number of layers kept FP32>")
            recipe = Recipe("mixed", keep=int(args[0]) if args else None)
        else:
            if args:
                raise ValueError(f"recipe {item!r}: {kind} takes no options")
            recipe = Recipe(kind)
        if recipe not in out:
            out.append(recipe)
    if not out:
        raise ValueError("no recipes given")
    return out


__all__ = ["DEFAULT_RECIPES", "KINDS", "PRECISION", "Recipe", "parse_recipes"]
