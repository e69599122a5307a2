"""normsam: sharpness-aware minimization for PyTorch, built around SAM-ON (perturb only the norm layers).

Public API; everything not re-exported here is private.
"""

from normsam.optim import (
    ASCENTS,
    BN_POLICIES,
    MASK_SCOPES,
    PARAMETER_SCOPES,
    PERTURBATIONS,
    BSAM,
    GCSAM,
    GSAM,
    SAM,
    SCOPES,
    WSAM,
    FriendlySAM,
    LookSAM,
    RhoFollowsLR,
    SAMOptions,
    RhoLambda,
    RhoSchedule,
    RhoWarmup,
    ParamInfo,
    ScopeReport,
    describe_scope,
    frozen_running_stats,
    is_norm_layer,
    param_groups,
    register_momentum_state,
)
from normsam.sharpness import SharpnessResult, measure_sharpness

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SAMOptions",
    "GSAM",
    "WSAM",
    "LookSAM",
    "FriendlySAM",
    "GCSAM",
    "BSAM",
    "RhoFollowsLR",
    "RhoSchedule",
    "RhoWarmup",
    "RhoLambda",
    "param_groups",
    "describe_scope",
    "is_norm_layer",
    "frozen_running_stats",
    "measure_sharpness",
    "SharpnessResult",
    "ParamInfo",
    "ScopeReport",
    "PERTURBATIONS",
    "SCOPES",
    "PARAMETER_SCOPES",
    "MASK_SCOPES",
    "BN_POLICIES",
    "ASCENTS",
    "register_momentum_state",
    "__version__",
]
