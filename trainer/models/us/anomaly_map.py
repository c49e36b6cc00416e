"""Uninformed Students' anomaly map: the ensemble's regression error plus its predictive variance.

Where the students have seen nothing like a patch, their mean misses the
teacher (error) and they disagree with each other (variance). The two terms
live on different scales, so each is standardised with its mean and standard
deviation over the training images' positions before they are added.
"""
from __future__ import annotations

import torch
from torch import Tensor


def error_and_variance(teacher_desc: Tensor, student_descs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per position: ||mean_m s_m - t||^2 and the students' variance, both averaged over channels.

    teacher_desc (B, D, h, w); student_descs M x (B, D, h, w) -> two (B, 1, h, w) maps.
    """
    s = torch.stack(student_descs)                             # (M, B, D, h, w)
    mean = s.mean(dim=0)                                       # (B, D, h, w)
    error = (mean - teacher_desc).pow(2).mean(dim=1, keepdim=True)
    variance = (s - mean).pow(2).mean(dim=0).mean(dim=1, keepdim=True)
    return error, variance


def standardised_sum(error: Tensor, variance: Tensor, stats: Tensor) -> Tensor:
    """(e - mean_e) / std_e + (v - mean_v) / std_v; stats = (mean_e, std_e, mean_v, std_v). Shape kept."""
    return (error - stats[0]) / stats[1] + (variance - stats[2]) / stats[3]
