"""The optimizer side of normsam: the SAM wrapper, perturbation models, scopes, masks, running statistics."""

from normsam.optim.ascent import ASCENTS, register_momentum_state
from normsam.optim.bsam import BSAM
from normsam.optim.groups import param_groups
from normsam.optim.options import SAMOptions
from normsam.optim.perturbations import PERTURBATIONS, PerturbationModel, get_perturbation, perturbation
from normsam.optim.rho_schedules import RhoFollowsLR, RhoLambda, RhoSchedule, RhoWarmup
from normsam.optim.running_stats import BN_POLICIES, frozen_running_stats, running_stat_modules
from normsam.optim.sam import SAM
from normsam.optim.variants import GCSAM, GSAM, WSAM, FriendlySAM, LookSAM
from normsam.optim.scopes import (
    MASK_SCOPES,
    PARAMETER_SCOPES,
    SCOPES,
    ParamInfo,
    ScopeReport,
    describe_scope,
    is_norm_layer,
)

__all__ = [
    "SAM",
    "SAMOptions",
    "GSAM",
    "WSAM",
    "LookSAM",
    "FriendlySAM",
    "GCSAM",
    "BSAM",
    "RhoSchedule",
    "RhoFollowsLR",
    "RhoWarmup",
    "RhoLambda",
    "ASCENTS",
    "register_momentum_state",
    "PERTURBATIONS",
    "PerturbationModel",
    "get_perturbation",
    "perturbation",
    "BN_POLICIES",
    "frozen_running_stats",
    "running_stat_modules",
    "SCOPES",
    "PARAMETER_SCOPES",
    "MASK_SCOPES",
    "ParamInfo",
    "ScopeReport",
    "describe_scope",
    "is_norm_layer",
    "param_groups",
]
