"""Which members of a cohort go on and which epoch is a member's best: successive halving's milestones and ranking,
and the rule by which an epoch's select metric beats the best so far."""
from __future__ import annotations

import math
from collections.abc import Sequence

from mtser.trainer.search_config import AshaConfig


def halving_milestones(asha: AshaConfig | None, epochs: int) -> set[int]:
    """Epochs at which successive halving ranks the members: grace·rf^k below the last epoch."""
    if asha is None:
        return set()
    milestones, m = set(), asha.grace_period
    while m < epochs:
        milestones.add(m)
        m *= asha.reduction_factor
    return milestones


def halving_survivors(names: Sequence[str], values: Sequence[float], factor: int) -> list[int]:
    """Positions successive halving keeps, in their order: the best ceil(n / factor) by value (higher is better, a
    non-finite value ranks last, ties go by name)."""
    def objective(g: int) -> float:
        return values[g] if math.isfinite(values[g]) else -math.inf

    ranked = sorted(range(len(names)), key=lambda g: (-objective(g), names[g]))
    return sorted(ranked[:math.ceil(len(names) / factor)])


def improves(value: float, best_value: float, best_epoch: int) -> bool:
    """Whether an epoch whose select metric is `value` becomes the best: the first evaluated epoch always (best_epoch
    0), later ones when strictly better (NaN never wins after the first)."""
    return best_epoch == 0 or value > best_value
