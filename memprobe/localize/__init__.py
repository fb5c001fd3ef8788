"""Localize memorization: per layer (SSLMem, LayerMem, ΔLayerMem) and per unit (UnitMem, ClassMem).

    from memprobe.localize import unitmem
    unitmem(acts, reduce="mean")   # acts: (points, augmentations, units), torch or numpy

See `memprobe.localize.unitmem` and `memprobe.localize.layermem` for the definitions.
"""

from memprobe.localize.layermem import (
    LayerMemResult,
    SSLMemScores,
    alignment_distances,
    delta_layermem,
    layermem,
    residual_sites,
    select_points,
    sslmem,
)
from memprobe.localize.unitmem import (
    ClassMemAccumulator,
    UnitMemAccumulator,
    channel_mean,
    classmem,
    selectivity_index,
    stream_unitmem,
    token_mean,
    unit_points,
    unitmem,
)

__all__ = [
    "ClassMemAccumulator",
    "LayerMemResult",
    "SSLMemScores",
    "UnitMemAccumulator",
    "alignment_distances",
    "channel_mean",
    "classmem",
    "delta_layermem",
    "layermem",
    "residual_sites",
    "select_points",
    "selectivity_index",
    "sslmem",
    "stream_unitmem",
    "unit_points",
    "token_mean",
    "unitmem",
]
