"""The config keys and what they mean, for ``normsam train --help``.

One line per key of :class:`normsam.train.config.TrainConfig`: its default and meaning, grouped as in the
dataclass. A key added to the config without a line here is still listed (with its default), and
``tests/test_friction.py`` asks for its line.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DESCRIPTIONS", "SAM_KEYS", "config_help", "check_overrides_take_effect", "default_text"]

#: The settings that only SAM uses: with ``scope: none`` (the plain base optimizer) they change nothing.
SAM_KEYS = frozenset({
    "perturbation", "rho", "eta", "normalize_bias", "norm_over", "sparsity", "mask_interval", "fisher_samples",
    "mask_refresh_epochs", "sam_start", "sam_end", "bn_policy", "cheap_ascent", "sync_ascent", "ascent_interval",
    "ascent_fraction", "ascent", "rho_warmup_epochs", "variant", "alpha", "gamma",
    "decouple", "reuse_norms", "sigma", "lmbda", "centralize", "ascent_steps", "descent_over", "rho_min",
})

#: key -> meaning. Sections follow the dataclass.
DESCRIPTIONS: dict[str, str] = {
    # data
    "data": "fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | webdataset | synthetic",
    "data_dir": "where the data lies (default: $NORMSAM_DATA, then the system's copy)",
    "download": "download the data set through torchvision when it is not found",
    "subset": "stratified subset of the training set (images; null: all)",
    "val_split": "share of the training set held out (stratified) as a validation split",
    "label_noise": "share of training labels flipped to a random other class (val/test stay clean)",
    "augment": "none | crop | crop-flip | autoaugment; null: crop-flip (crop for mnist)",
    "image_size": "image side for synthetic, imagefolder and webdataset data (streamed default: 224)",
    "loader": "memory | stream; null: stream for webdataset, memory otherwise",
    "loader_workers": "streamed data: DataLoader worker processes (null: 2; 0: the main process)",
    "val_data_dir": "webdataset: the validation shard pattern when data_dir is the training pattern",
    "shuffle_buffer": "webdataset: samples in each loader worker's shuffle buffer",
    # model
    "model": "resnet20/32/56, wrn28-10, vit-small, timm:NAME, torchvision:NAME",
    "norm": "batch | group | layer | none, for resnet*/wrn*",
    # base optimizer and schedule
    "epochs": "epochs to train (the cosine schedule ends with them)",
    "batch_size": "the whole step's batch (over all processes and micro-batches)",
    "optimizer": "base optimizer: sgd | adamw | lion",
    "lr": "peak learning rate (cosine schedule to 0); scientific notation works: 5e-4",
    "weight_decay": "the base optimizer's weight decay",
    "momentum": "sgd momentum; beta1 for adamw and lion",
    "warmup_epochs": "linear warm-up of the learning rate, in epochs (may be fractional)",
    "label_smoothing": "label smoothing of the training loss",
    # SAM
    "scope": "none (plain base optimizer) | all | norm (SAM-ON) | no-norm | random | ssam-f | ssam-d | [glob, ...]",
    "perturbation": "sam | asam | layerwise | linf | fisher",
    "rho": "perturbation radius; SAM-ON needs a larger rho than SAM-all (sam: 0.05-0.2 all, 0.5-1 norm)",
    "rho_warmup_epochs": "linear warm-up of rho over the first SAM epochs (may be fractional; 0: none); a "
                         "late SAM window (sam_start) warms up from its start",
    "eta": "eta of the scaling T (null: 0.01, fisher 1.0)",
    "normalize_bias": "apply the weight-dependent scaling T to biases too",
    "norm_over": "perturbed (norm over the perturbed set) | all (SSAM's convention)",
    "sparsity": "mask scopes only: share of elements NOT perturbed, e.g. 0.9995",
    "mask_interval": "ssam-d only: SAM steps between mask updates",
    "fisher_samples": "ssam-f: examples for the Fisher estimate",
    "mask_refresh_epochs": "ssam-f: epochs between Fisher-mask refreshes",
    "sam_start": "first epoch (0-based) with SAM steps; must be < epochs",
    "sam_end": "first epoch after the SAM window; null: until the end",
    "bn_policy": "running statistics in the second pass: freeze | update",
    "cheap_ascent": "the first pass computes only the perturbed tensors' gradients",
    "ascent_interval": "fast mode: a fresh ascent every k-th SAM step, the steps between reuse the last epsilon",
    "ascent_fraction": "fast mode: the ascent gradient from the first ceil(f * batch) examples",
    "ascent": "gradient | momentum (Momentum-SAM: epsilon from the base optimizer's momentum, no ascent pass)",
    "layerwise_scaling": "layerwise T: additive ||p|| + eta | official ||p|| * (1 + eta)",
    "scaled_tensors": "weight-dependent T on: not-bias | name-contains-weight (official)",
    "variant": "sam | gsam | wsam | looksam (its k is ascent_interval) | friendly-sam; an option of another "
               "variant is refused",
    "alpha": "gsam: weight of the orthogonal component (null: 0.4); looksam: weight of the reused one (null: 0.7)",
    "gamma": "wsam: weight of the sharpness term, in [0, 1) (null: 0.9)",
    "decouple": "wsam: the decoupled update, as decoupled weight decay (null: true, the paper's default)",
    "reuse_norms": "looksam: norms and cosines over all weights, global (null; the paper) | tensor (per tensor)",
    "sigma": "friendly-sam: weight of the gradient average taken off the ascent direction (null: 1)",
    "lmbda": "friendly-sam: decay of that gradient average (null: 0.9)",
    "centralize": "GCSAM: centralize the ascent direction's tensors of dim > 1, with any variant",
    "ascent_steps": "a multi-step ascent: k normalized steps of rho/k, the gradient taken again at each (k + 1 passes)",
    "descent_over": "gsam, wsam, looksam: the descent rule acts on the perturbed tensors | all (every gradient in "
                    "the ascent pass)",
    "rho_min": "GSAM's schedule: rho follows the learning rate, from rho at the peak lr to rho_min at lr 0 "
               "(null: a constant rho; not with rho_warmup_epochs)",
    # scale
    "amp": "off | bf16 | fp16 (with a GradScaler)",
    "bf16_kernels": "amp=bf16 on a CPU: native | upcast (bf16 convolutions and matrix products on the fp32 kernels: "
                    "same bf16 operands and results, fp32 accumulation as on a GPU, at fp32 speed)",
    "accumulation": "micro-batches per step (batch_size is the whole step's batch)",
    "clip_grad_norm": "clip the second-pass gradient's norm (null: no clipping)",
    "sync_ascent": "DDP: all-reduce the ascent gradient of the perturbed tensors",
    "parallel": "under torchrun: ddp | fsdp (FSDP2 fully_shard per block, sharded checkpoints)",
    "compile": "torch.compile the model",
    # analysis
    "norm_stats": "per-epoch quantiles and histograms of the norm layers' gamma and beta",
    "memorization": "with label noise: also score the flipped training examples (memorization of wrong labels)",
    "sharpness_at_end": "measure adaptive l-inf sharpness after the last epoch",
    "sharpness_rho": "rho of that measurement",
    "sharpness_steps": "APGD steps of that measurement",
    "sharpness_convention": "apgd | reference (the sharpness paper's code; 1 step measures at 0.75 rho)",
    # run
    "seed": "seeds data order, augmentation, initialization, subsets and splits",
    "out": "run folder; null: runs/<data>-<model>-<method>-s<seed>",
    "device": "auto | cpu | cuda",
    "threads": "CPU threads (>= 1; null: torch's default)",
    "eval_batch_size": "batch size of the evaluation",
    "eval_every": "evaluate every N epochs (and always after the last one)",
    "eval_subset": "evaluate on a fixed stratified subset of the test set (images)",
    "progress": "progress bars",
    "tensorboard": "also log to RUN_DIR/tensorboard",
}


def check_overrides_take_effect(overrides: dict) -> None:
    """``normsam train ... scope=none rho=2``: refuse SAM settings given together with ``scope=none`` on the
    command line, where they would be ignored. (Only there: a sweep's base may hold ρ for its SAM arms while its
    grid adds an SGD arm, and a config file may keep them for later; reports leave them out for scope none.)"""
    if overrides.get("scope") != "none":
        return
    ignored = sorted(set(overrides) & SAM_KEYS)
    if ignored:
        raise ValueError(
            f"scope=none trains with the plain base optimizer, so {', '.join(f'{k}={overrides[k]}' for k in ignored)} "
            "would be ignored: drop it, or pick a SAM scope (e.g. scope=norm)."
        )


def default_text(f: dataclasses.Field) -> str:
    """A config field's default as YAML writes it (``null``, ``true``/``false``, the value), for ``--help`` and
    the docs' config reference."""
    value = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_help() -> str:
    """The text ``normsam train --help`` ends with: every config key, its default and its meaning."""
    from normsam.train.config import TrainConfig

    fields = dataclasses.fields(TrainConfig)
    width = max(len(f"{f.name}={default_text(f)}") for f in fields)
    lines = ["config keys (key=default: meaning; set them in a YAML file or as key=value):"]
    for f in fields:
        key = f"{f.name}={default_text(f)}"
        lines.append(f"  {key:<{width}}  {DESCRIPTIONS.get(f.name, '')}".rstrip())
    return "\n".join(lines)
