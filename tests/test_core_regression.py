"""Every path of the core gives the parameters recorded before the core was rebuilt (issue 23), bit for bit.

The cases and the recorder are in tests/core_regression.py; the FSDP2 paths are pinned the same way in
tests/test_fsdp.py (its one torchrun launch) and DDP in tests/test_scale.py.
"""

from __future__ import annotations

import pytest
import torch

from tests import core_regression as core

RECORDED = torch.load(core.RECORD, weights_only=True)
CASES = core.cases()
RUNNER = core.runner_cases()


def test_the_record_covers_every_case():
    assert set(RECORDED) == set(CASES) | set(RUNNER)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_sam_path_is_bit_identical_to_the_record(name):
    got = CASES[name]()
    want = RECORDED[name]
    bound, why = core.TOLERANCES.get(name, (0.0, ""))
    if bound == 0.0:
        assert torch.equal(got, want), f"{name}: max |diff| {float((got - want).abs().max()):.3g}"
    else:
        assert float((got - want).abs().max()) <= bound, why


@pytest.mark.parametrize("name", sorted(RUNNER))
def test_the_runner_is_bit_identical_to_the_record(name, tmp_path):
    assert core.run_runner(RUNNER[name], tmp_path / "run") == RECORDED[name]
