"""Uninformed Students' loss: every student regresses the teacher's normalised descriptors."""
from __future__ import annotations

from torch import Tensor


def us_loss(teacher_desc: Tensor, student_descs: list[Tensor]) -> Tensor:
    """Squared error averaged over batch, channels and positions, then over students (a scalar).

    teacher_desc (B, D, h, w); student_descs M x (B, D, h, w).
    """
    return sum(((s - teacher_desc) ** 2).mean() for s in student_descs) / len(student_descs)
