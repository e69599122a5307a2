"""Run configuration: one typed dataclass, YAML files, presets and ``key=value`` overrides.

Values are plain and typed. A config is built from, in order: the defaults below, a preset or YAML file
(``--config quick`` or ``--config my.yaml``), then ``key=value`` overrides from the command line (values
parsed as YAML: ``rho=0.5``, ``subset=null``, ``download=true``). An unknown key or a value of the wrong
type is an error that lists the valid keys; the resolved config is saved in every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from normsam.files import read_yaml
from normsam.optim.amp import AMP_MODES, autocast, check_bf16_kernels
from normsam.optim.ascent import ASCENTS, check_momentum_options
from normsam.optim.descent import DESCENTS, make_descent
from normsam.optim.options import VARIANTS, SAMOptions
from normsam.optim.perturbations import LAYERWISE_SCALINGS, PERTURBATIONS, SCALED_TENSORS
from normsam.optim.rho_schedules import RhoFollowsLR, RhoWarmup
from normsam.optim.running_stats import BN_POLICIES
from normsam.optim.scopes import MASK_SCOPES, SCOPES
from normsam.optim.transforms import make_transforms

__all__ = [
    "TrainConfig",
    "PRESETS",
    "OPTIMIZERS",
    "load_config",
    "parse_overrides",
    "config_keys",
    "unknown_key_error",
    "AMP_MODES",
    "autocast",
    "SWEEP_EXAMPLES",
    "sweep_file",
]

OPTIMIZERS = ("sgd", "adamw", "lion")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_MODES = ("ddp", "fsdp")
PRESETS = ("quick", "paper-cifar100-wrn", "paper-imagenet-resnet50", "paper-imagenet-vit-s32")
#: Example sweep files shipped with the package (src/normsam/presets/sweeps/, copied in the repository's configs/).
SWEEP_EXAMPLES = ("sweep-tiny", "sweep-fmnist-small", "sweep-fmnist")


@dataclass
class TrainConfig:
    """Every setting of a training run. ``scope: none`` trains with the plain base optimizer."""

    # data
    data: str = "fashion-mnist"
    data_dir: Union[str, None] = None
    download: bool = False
    subset: Union[int, None] = None  # stratified subset of the training set
    val_split: float = 0.0  # stratified validation split taken from the training set
    label_noise: float = 0.0  # share of training labels flipped to a random other class (val/test clean)
    augment: Union[str, None] = None  # none | crop | crop-flip | autoaugment; None: crop-flip (crop for mnist)
    # (streamed data: rrc-flip (default) | rrc-flip-randaugment | rrc-flip-autoaugment | none)
    image_size: Union[int, None] = None  # synthetic, imagefolder and webdataset (streamed default: 224)
    # streamed data (normsam.train.data.streamed): data=webdataset, or data=imagefolder loader=stream
    loader: Union[str, None] = None  # memory | stream; None: stream for webdataset, memory otherwise
    loader_workers: Union[int, None] = None  # streamed: DataLoader worker processes (None: 2; 0: main process)
    val_data_dir: Union[str, None] = None  # webdataset: validation shard pattern when data_dir is a train pattern
    shuffle_buffer: int = 1000  # webdataset: samples in each worker's shuffle buffer
    # model
    model: str = "resnet20"
    norm: Union[str, None] = None  # batch | group | layer | none, for resnet*/wrn*
    # base optimizer and schedule
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd momentum; beta1 for adamw and lion
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    # SAM
    scope: Union[str, list] = "norm"  # none | all | norm | no-norm | random | ssam-f | ssam-d | [glob, ...]
    perturbation: str = "sam"
    rho: float = 0.5
    rho_warmup_epochs: float = 0.0  # linear ρ warm-up over the first SAM epochs (normsam.RhoWarmup); 0: none
    eta: Union[float, None] = None
    normalize_bias: bool = False
    norm_over: str = "perturbed"
    sparsity: Union[float, None] = None  # element-mask scopes
    mask_interval: Union[int, None] = None  # ssam-d: SAM steps between mask updates
    fisher_samples: int = 128  # ssam-f: examples for the Fisher estimate
    mask_refresh_epochs: int = 1  # ssam-f: epochs between Fisher-mask refreshes
    sam_start: int = 0  # first epoch (0-based) with SAM steps
    sam_end: Union[int, None] = None  # first epoch after the SAM window; None: until the end
    bn_policy: str = "freeze"
    cheap_ascent: bool = True  # first pass computes only the perturbed tensors' gradients
    ascent_interval: int = 1  # fast mode: a fresh ascent every k-th SAM step, the steps between reuse the last ε
    ascent_fraction: float = 1.0  # fast mode: the ascent gradient from the first ceil(f * batch) examples
    ascent: str = "gradient"  # gradient | momentum (Momentum-SAM: ε from the base optimizer's momentum, no ascent pass)
    layerwise_scaling: str = "additive"  # layerwise T: additive ||p|| + eta | official ||p|| * (1 + eta)
    scaled_tensors: str = "not-bias"  # weight-dependent T on: not-bias | name-contains-weight (official)
    # SAM's variants (normsam.optim.descent, .transforms); None: the variant's default
    variant: str = "sam"  # sam | gsam | wsam | looksam (k = ascent_interval) | friendly-sam
    alpha: Union[float, None] = None  # gsam: weight of the orthogonal component (0.4); looksam: of the reused one (0.7)
    gamma: Union[float, None] = None  # wsam: weight of the sharpness term, in [0, 1) (0.9)
    decouple: Union[bool, None] = None  # wsam: the decoupled update (true)
    reuse_norms: Union[str, None] = None  # looksam: global (the paper) | tensor
    sigma: Union[float, None] = None  # friendly-sam: sigma (1)
    lmbda: Union[float, None] = None  # friendly-sam: lambda (0.9)
    centralize: bool = False  # GCSAM: centralize the ascent direction (tensors of dim > 1), with any variant
    ascent_steps: int = 1  # a multi-step ascent: k steps of rho/k (k + 1 passes)
    descent_over: str = "perturbed"  # gsam, wsam, looksam: the descent rule acts on the perturbed | all tensors
    rho_min: Union[float, None] = None  # GSAM's schedule: rho follows the lr from rho down to rho_min (null: constant)
    # scale
    amp: str = "off"  # off | bf16 | fp16
    bf16_kernels: str = "native"  # amp=bf16 on a CPU: native | upcast (matrix products on fp32 kernels, normsam.optim.amp)
    accumulation: int = 1  # micro-batches per step (batch_size is the whole step's batch)
    clip_grad_norm: Union[float, None] = None  # on the second-pass gradient
    sync_ascent: bool = False  # DDP: all-reduce the ascent gradient of the perturbed tensors (FSDP2: always)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard per block, sharded checkpoints)
    compile: bool = False  # torch.compile the model
    # analysis
    norm_stats: bool = True  # per-epoch quantiles and histograms of the norm layers' γ and β
    memorization: bool = True  # label noise: score the flipped training examples too (normsam.train.memorization)
    sharpness_at_end: bool = False  # measure adaptive ℓ∞ sharpness after the last epoch
    sharpness_rho: float = 0.003  # the poster's ρ for 20 steps (SPEC §3)
    sharpness_steps: int = 20
    sharpness_convention: str = "apgd"  # apgd | reference (the sharpness paper's code; 1 step measures at 0.75ρ)
    # run
    seed: int = 0
    out: Union[str, None] = None  # run folder; None: runs/<data>-<model>-<method>-s<seed>
    device: str = "auto"
    threads: Union[int, None] = None
    eval_batch_size: int = 512
    eval_every: int = 1  # evaluate every N epochs (and always after the last one)
    eval_subset: Union[int, None] = None  # evaluate on a fixed stratified subset of the test set
    progress: bool = True
    tensorboard: bool = False

    @property
    def method(self) -> str:
        """A short label: sgd, or <scope>-<perturbation>-rho<ρ> (e.g. norm-asam-rho5.0), then the variant and its
        options that differ from their defaults (norm-sam-rho0.5-gsam-alpha0.2-rhomin0.05, norm-sam-rho0.5-looksam-k5)
        and the other non-default options (-ascent4, -frac0.5, -gc, -ascentsteps2, -descentall …)."""
        if self.scope == "none":
            return self.optimizer
        scope = self.scope if isinstance(self.scope, str) else "patterns"
        label = f"{scope}-{self.perturbation}-rho{self.rho:g}" + self._variant_label()
        # non-default fast modes and fidelity options change the method, so runs and reports keep them apart
        if self.ascent_interval != 1 and self.variant != "looksam":  # (LookSAM's k: in its own part)
            label += f"-ascent{self.ascent_interval}"
        if self.ascent_fraction != 1.0:
            label += f"-frac{self.ascent_fraction:g}"
        if self.ascent != "gradient":
            label += f"-{self.ascent}"
        if self.rho_warmup_epochs:
            label += f"-rhowarmup{self.rho_warmup_epochs:g}"
        if self.layerwise_scaling != "additive":
            label += f"-lw-{self.layerwise_scaling}"
        if self.scaled_tensors != "not-bias":
            label += f"-T-{self.scaled_tensors}"
        if self.centralize:
            label += "-gc"
        if self.ascent_steps != 1:
            label += f"-ascentsteps{self.ascent_steps}"
        if self.descent_over != "perturbed":
            label += f"-descent{self.descent_over}"
        if self.rho_min is not None:
            label += f"-rhomin{self.rho_min:g}"
        return label

    def _variant_label(self) -> str:
        """The variant and its options that differ from the variant's defaults (``-gsam-alpha0.2``,
        ``-looksam-k5``, ``-wsam-coupled``), or ``""`` for SAM; an option at its default leaves no trace, so
        ``alpha=0.4`` and ``alpha=null`` (the same GSAM) carry the same label."""
        if self.variant == "sam" or self.variant not in VARIANTS:
            return ""
        label = f"-{self.variant}" + (f"-k{self.ascent_interval}" if self.variant == "looksam" else "")
        defaults = _variant_defaults(self.variant)
        for key, value in defaults.items():
            given = getattr(self, key)
            if given is None or given == value:
                continue
            if key == "decouple":  # (False: the default is True)
                label += "-coupled"
            elif key == "reuse_norms":
                label += f"-{given}norms"
            else:
                label += f"-{key}{given:g}" if isinstance(given, (int, float)) else f"-{key}{given}"
        return label

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sam_options(self, steps_per_epoch: int) -> SAMOptions | None:
        """The run's :class:`~normsam.optim.options.SAMOptions` (``None`` for ``scope=none``: no SAM), the one
        place where the config's keys become SAM's. ``steps_per_epoch`` turns the epoch-counted keys into SAM
        steps: ``rho_warmup_epochs`` (a :class:`~normsam.optim.rho_schedules.RhoWarmup` of at least one step,
        counted in SAM steps, so a late SAM window warms up from its own start) and ssam-d's schedule length
        (the SAM window's steps). ``rho_min`` is GSAM's schedule, :class:`~normsam.optim.rho_schedules.RhoFollowsLR`
        from ``rho`` at the peak lr to ``rho_min`` at lr 0 (where the runner's cosine ends); the variant's keys
        (``variant``, ``alpha`` … ``descent_over``) are SAM's options of the same names, ``None`` meaning the
        variant's default."""
        if self.scope == "none":
            return None
        schedule: RhoWarmup | RhoFollowsLR | None = None
        if self.rho_warmup_epochs:
            schedule = RhoWarmup(max(1, round(self.rho_warmup_epochs * steps_per_epoch)))
        elif self.rho_min is not None:  # GSAM's: ρ ∝ lr, from rho at the peak lr to rho_min at 0 (the cosine's end)
            schedule = RhoFollowsLR(rho_min=self.rho_min, lr_min=0.0)
        return SAMOptions(
            scope=self.scope,
            rho=self.rho,
            perturbation=self.perturbation,
            eta=self.eta,
            normalize_bias=self.normalize_bias,
            norm_over=self.norm_over,
            bn_policy=self.bn_policy,
            # (True under parallel=fsdp: the config records what FSDP2 does; unset for the momentum ascent,
            # which has no ascent gradient to average, and whose config refuses sync_ascent=true)
            sync_ascent=None if self.ascent == "momentum" else self.sync_ascent,
            ascent_interval=self.ascent_interval,
            ascent=self.ascent,
            layerwise_scaling=self.layerwise_scaling,
            scaled_tensors=self.scaled_tensors,
            rho_schedule=schedule,
            **self._variant_options(),
            **self._mask_options(steps_per_epoch),
        )

    def _mask_options(self, steps_per_epoch: int) -> dict[str, Any]:
        masks: dict[str, Any] = {}
        if self.scope in MASK_SCOPES:
            masks.update(sparsity=self.sparsity, mask_seed=self.seed)
        if self.scope == "ssam-d":
            sam_epochs = (self.sam_end or self.epochs) - self.sam_start
            masks.update(mask_interval=self.mask_interval, mask_total_steps=max(1, sam_epochs * steps_per_epoch))
        return masks

    def _variant_options(self) -> dict[str, Any]:
        """The variant's keys, which are SAM's options of the same names."""
        return {key: getattr(self, key) for key in ("variant", "alpha", "gamma", "decouple", "reuse_norms", "sigma",
                                                    "lmbda", "centralize", "ascent_steps", "descent_over")}

    def _check_variant(self) -> None:
        """The variant's keys, checked by :class:`~normsam.optim.options.SAMOptions` itself before any training (an
        option of another variant refused by name, the combinations a variant cannot honour): with the keys
        those checks read, so that the other SAM keys keep the checks they had (a config that loaded before
        still loads)."""
        SAMOptions(scope=self.scope, ascent_interval=self.ascent_interval, ascent=self.ascent,
                   **self._variant_options(), **self._mask_options(steps_per_epoch=1))

    def validate(self) -> TrainConfig:
        """Check values (types are checked on load); raise ValueError naming the fix."""
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("perturbation", self.perturbation, tuple(PERTURBATIONS))
        _one_of("bn_policy", self.bn_policy, BN_POLICIES)
        _one_of("amp", self.amp, AMP_MODES)
        check_bf16_kernels(self.bf16_kernels, amp=self.amp, device_type="cuda" if self.device == "cuda" else "cpu")
        if self.bf16_kernels == "upcast" and (self.parallel == "fsdp" or self.compile):
            raise ValueError("bf16_kernels=upcast is not supported with "
                             f"{'parallel=fsdp' if self.parallel == 'fsdp' else 'compile=true'} (untested): "
                             "drop bf16_kernels, or train without it.")
        _one_of("device", self.device, DEVICES)
        _one_of("norm_over", self.norm_over, ("perturbed", "all"))
        _one_of("layerwise_scaling", self.layerwise_scaling, LAYERWISE_SCALINGS)
        _one_of("scaled_tensors", self.scaled_tensors, SCALED_TENSORS)
        if self.layerwise_scaling != "additive" and self.perturbation != "layerwise":
            raise ValueError(
                f"layerwise_scaling={self.layerwise_scaling} only changes perturbation=layerwise, not "
                f"{self.perturbation}: drop it or set perturbation=layerwise."
            )
        if not 0 < self.ascent_fraction <= 1:
            raise ValueError(
                f"ascent_fraction must lie in (0, 1], got {self.ascent_fraction}: the share of each batch whose "
                "gradient gives the ascent, e.g. ascent_fraction=0.25 (1: the whole batch)."
            )
        _one_of("sharpness_convention", self.sharpness_convention, ("apgd", "reference"))
        _one_of("ascent", self.ascent, ASCENTS)
        if self.ascent == "momentum":
            _check_momentum_ascent(self)
        if isinstance(self.scope, str):
            _one_of("scope", self.scope, ("none",) + SCOPES)
        elif not self.scope or not all(isinstance(p, str) for p in self.scope):
            raise ValueError(f"scope as a list must hold glob patterns over parameter names, got {self.scope!r}.")
        for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "accumulation", "fisher_samples",
                    "mask_refresh_epochs", "sharpness_steps", "ascent_interval", "ascent_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")
        for key in ("lr", "weight_decay", "momentum", "warmup_epochs", "label_smoothing", "rho", "sharpness_rho",
                    "rho_warmup_epochs"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be >= 0 and finite, got {getattr(self, key)}.")
        if not self.momentum < 1:  # AdamW/Lion would call it "Invalid beta parameter at index 0"
            raise ValueError(
                f"momentum must lie in [0, 1), got {self.momentum}: it is SGD's momentum and beta1 of adamw and lion "
                "(e.g. momentum=0.9)."
            )
        if self.rho_warmup_epochs and self.scope == "none":
            raise ValueError(
                f"rho_warmup_epochs={self.rho_warmup_epochs:g} warms up SAM's rho, and scope=none trains without SAM: "
                "drop rho_warmup_epochs or set a scope (scope=norm: SAM-ON)."
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {self.threads}.")
        if self.sparsity is not None and self.scope not in MASK_SCOPES:
            raise ValueError(
                f"sparsity={self.sparsity} is only used by the element-mask scopes {', '.join(MASK_SCOPES)}; "
                f"scope={self.scope} perturbs whole tensors. Drop sparsity= or pick a mask scope."
            )
        if self.mask_interval is not None and self.scope != "ssam-d":
            raise ValueError(
                f"mask_interval={self.mask_interval} is only used by scope=ssam-d, not scope={self.scope}; drop it."
            )
        if not 0 <= self.val_split < 1:
            raise ValueError(f"val_split must lie in [0, 1), got {self.val_split}.")
        if self.eval_subset is not None and self.eval_subset < 1:
            raise ValueError(f"eval_subset must be >= 1 test images (or null for all), got {self.eval_subset}.")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must lie in [0, 1), got {self.label_noise}; e.g. label_noise=0.4.")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}.")
        if self.batch_size % self.accumulation:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by accumulation={self.accumulation}: "
                "batch_size is the whole step's batch, split into `accumulation` equal micro-batches."
            )
        if self.sam_start < 0 or (self.sam_end is not None and self.sam_end <= self.sam_start):
            raise ValueError(
                f"SAM window sam_start={self.sam_start}, sam_end={self.sam_end} is empty: need "
                "0 <= sam_start < sam_end (sam_end=null runs SAM until the last epoch)."
            )
        if self.scope in MASK_SCOPES and self.sparsity is None:
            raise ValueError(f"scope={self.scope} needs sparsity=<share of elements not perturbed>, e.g. 0.9995.")
        if self.scope == "ssam-d" and self.mask_interval is None:
            raise ValueError("scope=ssam-d needs mask_interval=<SAM steps between mask updates>, e.g. 100.")
        _one_of("parallel", self.parallel, PARALLEL_MODES)
        if self.parallel == "fsdp" and self.ascent == "gradient":
            self.sync_ascent = True  # FSDP2 reduces every gradient: the ascent gradient is the global batch's
            # (the momentum ascent has no ascent gradient: its momentum is built from the reduced gradients)
        if self.parallel == "fsdp" and (self.amp == "fp16" or self.compile):
            raise ValueError(
                f"parallel=fsdp does not support {'amp=fp16 (its GradScaler needs a sharded one)' if self.amp == 'fp16' else 'compile=true'} "
                "yet: use amp=bf16 or amp=off, compile=false, or parallel=ddp."
            )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or null to disable), got {self.clip_grad_norm}.")
        _one_of("variant", self.variant, VARIANTS)
        _one_of("descent_over", self.descent_over, ("perturbed", "all"))
        if self.rho_min is not None:
            _check_rho_min(self)
        if self.scope != "none":
            self._check_variant()
        return self

    def check_world_size(self, world_size: int) -> None:
        """Refuse what cannot run on ``world_size`` processes; called by the runner before it loads anything.

        A descent rule (``variant`` gsam, wsam, looksam) combines the ascent gradient with the second pass's in
        the update itself; under DDP without ``sync_ascent`` each process would use its own ascent gradient, so
        the processes' updates, and then their weights, would drift apart (DDP keeps only the gradients of the
        second pass in step), and none would follow the algorithm on the global batch."""
        if (world_size > 1 and self.scope != "none" and self.parallel == "ddp" and not self.sync_ascent
                and self.variant in _DESCENT_VARIANTS):
            raise ValueError(
                f"variant={self.variant} under DDP needs sync_ascent=true: its update combines the ascent gradient "
                f"with the second pass's, and without sync_ascent each of the {world_size} processes would use its "
                "own ascent gradient, so their weights would drift apart and the run would not be "
                f"{self.variant} on the global batch. Add sync_ascent=true (one all-reduce of the perturbed "
                "tensors' ascent gradient per step)."
            )


#: The variants with a descent rule: the update combines the ascent gradient with the second pass's.
_DESCENT_VARIANTS = tuple(d for d in DESCENTS if d != "sam")


def _variant_defaults(variant: str) -> dict[str, Any]:
    """A variant's options and their defaults, read off the pieces that apply them (the method label leaves out
    an option at its default)."""
    if variant in _DESCENT_VARIANTS:
        rule = make_descent(variant)
        keys = {"gsam": ("alpha",), "wsam": ("gamma", "decouple"), "looksam": ("alpha", "reuse_norms")}[variant]
        return {key: getattr(rule, key) for key in keys}
    if variant == "friendly-sam":
        friendly = make_transforms(centralize=False, variant=variant, sigma=None, lmbda=None, foreach=True)[-1]
        return {"sigma": friendly.sigma, "lmbda": friendly.lmbda}
    return {}


def _check_rho_min(cfg: TrainConfig) -> None:
    """``rho_min``: GSAM's ρ schedule, ρ following the lr from ``rho`` down to ``rho_min``."""
    if not 0 <= cfg.rho_min < math.inf:
        raise ValueError(f"rho_min must be >= 0 and finite, got {cfg.rho_min}.")
    conflicts = [
        (cfg.scope == "none", f"rho_min={cfg.rho_min:g} makes SAM's rho follow the learning rate, and scope=none "
                              "trains without SAM: drop rho_min or set a scope (scope=norm: SAM-ON)"),
        (bool(cfg.rho_warmup_epochs),
         f"rho_min={cfg.rho_min:g} (rho following the learning rate, GSAM's schedule) and rho_warmup_epochs="
         f"{cfg.rho_warmup_epochs:g} (a linear warm-up of rho) are two rho schedules, and a run has one: drop one "
         "of them (with warmup_epochs, rho_min's rho follows the learning rate's warm-up too)"),
        (cfg.rho_min > cfg.rho,
         f"rho_min={cfg.rho_min:g} is above rho={cfg.rho:g}: rho follows the learning rate from rho (at the peak lr) "
         "down to rho_min (at lr 0), so rho_min must be <= rho"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise ValueError(message + ".")


def _check_momentum_ascent(cfg: TrainConfig) -> None:
    """``ascent=momentum``: the settings it cannot run with, refused before any training (the same check as
    SAM's, normsam.optim.ascent, plus the runner's own keys)."""
    conflicts = [
        (cfg.scope == "none", "ascent=momentum chooses SAM's ascent direction, and scope=none trains without SAM: "
                              "drop ascent or set a scope (scope=norm: SAM-ON)"),
        (cfg.ascent_fraction != 1.0,
         "ascent=momentum has no ascent pass, so ascent_fraction has nothing to save: drop it"),
        (cfg.optimizer in ("sgd", "adamw") and cfg.momentum == 0,
         f"ascent=momentum perturbs along the base optimizer's momentum, and optimizer={cfg.optimizer} with "
         "momentum=0 keeps none: set momentum=0.9"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise ValueError(message + ".")
    check_momentum_options(perturbation=cfg.perturbation, scope=cfg.scope, ascent_interval=cfg.ascent_interval,
                           sync_ascent=cfg.sync_ascent, bn_policy=cfg.bn_policy)


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {key}: {value!r}; valid values are {', '.join(map(str, valid))}.")


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


_HINTS = typing.get_type_hints(TrainConfig)
#: A decimal number in scientific notation as people write it: 5e-4, 1E+3, -2.5e-1, .5e2.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _allowed_types(key: str) -> tuple[type, ...]:
    hint = _HINTS[key]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
    return (hint,)


def _coerce(key: str, value: Any) -> Any:
    """Check (and where lossless, convert) a value for ``key``: int → float, number → str."""
    allowed = _allowed_types(key)
    if value is None:
        if type(None) in allowed:
            return None
    elif isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, float) and int in allowed and value.is_integer():
        return int(value)
    elif isinstance(value, list) and list in allowed:
        return value
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, (int, float)) and str in allowed:
        return str(value)
    elif isinstance(value, str) and float in allowed and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string; a float field takes it
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"Wrong type for {key}: {value!r} ({type(value).__name__}); expected {names}.")


def unknown_key_error(key: str, where: str) -> ValueError:
    """The error for an unknown config key: a close match and the list of valid keys."""
    close = difflib.get_close_matches(key, config_keys(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(config_keys())}.")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["rho=0.5", "subset=null"]`` → ``{"rho": 0.5, "subset": None}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not key=value, e.g. rho=0.5 or scope=all.")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def sweep_file(source: str | Path) -> Path:
    """A sweep file: ``source`` when that file exists, else the packaged example of that name
    (:data:`SWEEP_EXAMPLES`, with or without ``.yaml``), so that ``normsam sweep sweep-tiny`` works anywhere."""
    path = Path(source)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if name in SWEEP_EXAMPLES and (path.parent == Path(".") or path.parent.name == "configs"):
        return Path(str(resources.files("normsam").joinpath("presets", "sweeps", f"{name}.yaml")))
    raise FileNotFoundError(
        f"No sweep file {source}; pass a YAML file or the name of an example shipped with normsam: "
        f"{', '.join(SWEEP_EXAMPLES)}."
    )


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """A preset name or a YAML file → (mapping, description)."""
    if source in PRESETS:
        text = resources.files("normsam").joinpath("presets", f"{source}.yaml").read_text()
        where = f"preset {source!r}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"Config {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file."
            )
        text, where = path.read_text(), str(path)
    data = read_yaml(where, text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a mapping of config keys, got {type(data).__name__}.")
    return data, where


def load_config(
    config: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then a preset or YAML file, then overrides; typed and validated."""
    values: dict[str, Any] = {}
    layers: list[tuple[dict[str, Any], str]] = []
    if config is not None:
        layers.append(_read_yaml(config))
    if overrides:
        parsed = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        layers.append((parsed, "the overrides"))
    valid = set(config_keys())
    for data, where in layers:
        for key, value in data.items():
            if key not in valid:
                raise unknown_key_error(key, where)
            values[key] = _coerce(key, value)
    return TrainConfig(**values).validate()


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write ``config.yaml`` atomically: a full disk while it is rewritten at a resume must not leave half a
    config behind (the next resume reads it)."""
    from normsam.train.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_file(path: Path) -> TrainConfig:
    """A run folder's resolved ``config.yaml``."""
    return load_config(str(path))
