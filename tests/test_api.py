"""The public API named in the issues is importable from the top-level package."""

import inspect

import normsam


def test_contract_names():
    for name in ("SAM", "param_groups", "describe_scope", "measure_sharpness", "is_norm_layer", "SharpnessResult"):
        assert name in normsam.__all__ and hasattr(normsam, name), name
    sam = inspect.signature(normsam.SAM)
    for kw in ("rho", "perturbation", "eta", "normalize_bias", "norm_over", "scope"):
        assert sam.parameters[kw].kind is inspect.Parameter.KEYWORD_ONLY, kw
    assert sam.parameters["rho"].default is None and sam.parameters["norm_over"].default == "perturbed"  # ρ required
    sharp = inspect.signature(normsam.measure_sharpness)
    assert [p for p in ("rho", "kind", "norm", "adaptive", "steps", "scope", "loss_fn", "logit_normalize",
                        "rand_init", "seed") if p not in sharp.parameters] == []
    assert sharp.parameters["kind"].default == "worst" and sharp.parameters["steps"].default == 20
