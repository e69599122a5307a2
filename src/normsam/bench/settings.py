"""The SAM variants' hyperparameters in the benchmark, one value shared by normsam's rows
(:mod:`normsam.bench.sam_variants`) and the peer's (:mod:`normsam.bench.yardsticks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["VariantSettings"]


@dataclass(frozen=True)
class VariantSettings:
    """The variants' hyperparameters, the same for normsam's rows and the peer's: pytorch_optimizer's defaults,
    but LookSAM's k (5, the paper's; pytorch_optimizer's default is 10: a round would time 10 steps of each
    LookSAM row) and LookSAM's norms taken per tensor as pytorch_optimizer takes them (``reuse_norms="tensor"``;
    normsam's default, ``"global"``, is the paper's Algorithm 1), so that both sides do the same arithmetic."""

    gsam_alpha: float = 0.4
    wsam_gamma: float = 0.9
    wsam_decouple: bool = True
    looksam_k: int = 5
    looksam_alpha: float = 0.7
    friendly_sigma: float = 1.0
    friendly_lmbda: float = 0.9
    ascent_steps: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.looksam_k, int) or self.looksam_k < 2:
            raise ValueError(f"LookSAM's k must be an int >= 2 (a full step every k-th step), got {self.looksam_k!r}.")
        if not isinstance(self.ascent_steps, int) or self.ascent_steps < 2:
            raise ValueError(f"the multi-step ascent's ascent_steps must be an int >= 2, got {self.ascent_steps!r}.")

    def options(self, family: str) -> dict[str, Any]:
        """The SAMOptions that make normsam's SAM the variant ``family`` (a key of VARIANT_FAMILIES)."""
        return {
            "gsam": dict(variant="gsam", alpha=self.gsam_alpha),
            "wsam": dict(variant="wsam", gamma=self.wsam_gamma, decouple=self.wsam_decouple),
            "looksam": dict(variant="looksam", ascent_interval=self.looksam_k, alpha=self.looksam_alpha,
                            reuse_norms="tensor"),
            "friendly-sam": dict(variant="friendly-sam", sigma=self.friendly_sigma, lmbda=self.friendly_lmbda),
            "gcsam": dict(centralize=True),
        }[family]

    def cycle(self, family: str) -> int:
        return self.looksam_k if family == "looksam" else 1
