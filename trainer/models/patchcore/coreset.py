"""Greedy k-centre coreset (PatchCore): a few patches that cover all the others.

Each step adds the patch farthest from everything chosen so far, so the
chosen set's covering radius shrinks as fast as a greedy choice can make it:
a rare normal patch (a screw's tip, a bottle's rim) keeps a representative
where a random subsample would drop it, and the nearest-neighbour distance of
any normal patch to the coreset stays small.
"""
from __future__ import annotations

import torch
from torch import Tensor


def greedy_coreset(x: Tensor, n: int, gen: torch.Generator, dim: int = 64) -> Tensor:
    """Indices of `n` rows of x (P, D) chosen by k-centre greedy, all rows when n >= P.

    Distances are measured on a random Gaussian projection to `dim` dimensions
    when D is larger (Johnson-Lindenstrauss: pairwise distances kept within a
    small factor), which makes each step cost P * dim instead of P * D.
    """
    if n >= len(x):
        return torch.arange(len(x))
    x = x.float()
    if x.shape[1] > dim:
        x = x @ (torch.randn(x.shape[1], dim, generator=gen) / dim ** 0.5)   # (P, dim)
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(len(x), (1,), generator=gen))
    sq = x.pow(2).sum(1)                                                   # (P,)
    mind = (sq - 2 * x @ x[chosen[0]] + sq[chosen[0]]).clamp_min(0)        # squared distance to the set
    for i in range(1, n):
        j = int(mind.argmax())
        chosen[i] = j
        mind = torch.minimum(mind, (sq - 2 * x @ x[j] + sq[j]).clamp_min(0))
    return chosen
