"""SAM on FSDP2-sharded models (issue 15), checked with 2 gloo processes on the CPU.

All cases run in one ``torchrun`` launch (tests/fsdp_cases.py; starting processes costs seconds each); the
tests below read its per-case records. The core claim: an FSDP2 SAM step, each rank on half the batch, equals
the one-process step on the whole batch to 1e-6, for every perturbation × cheap/classic ascent × scope
norm/all, with LayerNorm and RMSNorm models, over several steps with the base optimizer's state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normsam

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="needs torch.distributed and torchrun",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["timeout", "240", torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "fsdp_cases.py"),
         str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _case(results: dict, name: str) -> dict:
    record = results[name]
    assert record["ok"], record.get("error")
    return record


EQUIVALENCE = [
    f"eq-{norm}-{p}-{ascent}-{scope}"
    for norm in ("layer", "rms") for p in normsam.PERTURBATIONS for ascent in ("cheap", "classic")
    for scope in ("norm", "all")
] + ["eq-loop-sam", "eq-loop-layerwise", "eq-loop-fisher", "eq-norm-over-all", "eq-no-norm", "eq-patterns",
     "eq-adamw", "eq-ascent-interval-cheap", "eq-ascent-interval-classic", "mixed-sam-cheap", "mixed-sam-classic", "mixed-layerwise-cheap", "mixed-layerwise-classic", "eq-momentum-sam-norm", "eq-momentum-sam-all",
     "eq-momentum-layerwise-norm", "eq-momentum-layerwise-all", "eq-momentum-adamw", "mixed-momentum"] + [
    f"hsdp-{shape}-{case}" for shape in ("2x1", "1x2") for case in ("sam", "layerwise", "mixed")]


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_fsdp2_step_equals_the_one_process_step(results, name):
    record = _case(results, name)
    assert record["diff"] < TOL, {k: v for k, v in record.items() if k != "params"}
    assert record["sam_vs_sgd"] > 1e-2, "SAM must differ from plain SGD here, or the comparison proves nothing"
    assert record["base_state"] > 0  # the base optimizer's state (momentum, Adam moments) took part


VARIANTS = [f"var-{name}-{ascent}-{scope}" for name in ("gsam", "wsam", "wsam-coupled", "looksam", "friendly", "gc",
                                                          "multistep")
            for ascent in ("cheap", "classic") for scope in ("norm", "all")] + ["var-gsam-over-all", "var-gsam-mixed"]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_on_fsdp2_equals_the_one_process_step(results, name):
    """GSAM, WSAM, LookSAM, Friendly-SAM, GCSAM and the multi-step ascent on FSDP2 shards (issue 25): the same
    steps as in one process on the whole batch."""
    record = _case(results, name)
    assert record["diff"] < TOL, {k: v for k, v in record.items() if k != "params"}
    assert record["sam_vs_sgd"] > 1e-2


FSDP_RECORD = json.loads((ROOT / "tests" / "data" / "fsdp_regression.json").read_text())


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_fsdp2_path_is_bit_identical_to_the_record(results, name):
    """The FSDP2 model's weights after the case's steps, as recorded before the core was rebuilt (issue 23;
    SHA-256 of the float32 weights in parameter order)."""
    import hashlib

    weights = torch.tensor(_case(results, name)["params"], dtype=torch.float32)
    assert hashlib.sha256(weights.numpy().tobytes()).hexdigest() == FSDP_RECORD[name]


def test_mixed_precision_policy_cheap_ascent_equals_classic(results):
    record = _case(results, "mixed_precision")
    assert record["shard_dtype"] == "torch.float32"
    assert record["cheap_vs_classic"] < TOL and record["sam_vs_adamw"] > 1e-3, record


def test_micro_batch_cheap_ascent_through_ascent_inputs(results):
    record = _case(results, "accumulation")
    assert record["diff"] < TOL and record["perturbed_are_plain"]


def test_issue_report_sam_on_no_longer_trains_as_plain_sgd(results):
    """Regression: the cheap ascent used to leave the weights equal to SGD's (3e-8) and the classic API
    died with a bare AssertionError in count_nonfinite."""
    record = _case(results, "issue_report")
    for ascent in ("cheap", "classic"):
        assert record[ascent]["vs_sgd"] > 1e-2, record
        assert record[ascent]["vs_reference"] < TOL, record


def test_cheap_ascent_reduce_scatters_only_the_perturbed_tensors(results):
    record = _case(results, "reduce_scatter")
    assert record["first_pass_numel"] == record["perturbed_numel"] == 62  # the two norm layers' γ and β
    assert record["second_pass_numel"] == record["all_numel"]
    assert record["grads_after_first"] == []  # the cheap ascent leaves .grad as it found it


def test_backup_holds_local_shards_and_restore_is_exact(results):
    record = _case(results, "storage")
    assert record["same_storage"]
    assert record["backup_numel"] == record["local_numel"] < record["global_numel"]
    assert record["moved"] > 0
    assert record["restore_exact"]


def test_fsdp2_step_makes_no_host_sync(results):
    assert _case(results, "no_host_sync") == {"ok": True, "sam": [], "layerwise": [], "linf": []}


def test_nonfinite_ascent_gradient_on_one_rank_is_skipped_on_all(results):
    record = _case(results, "nonfinite")
    assert record["moved"] == 0.0
    assert record["nonfinite"] == 1


def test_running_statistics_freeze_under_fsdp2(results):
    record = _case(results, "running_stats")
    assert record["moved_in_first"] and record["frozen"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("sync_ascent_false", "sync_ascent=False .* cannot be honoured under FSDP2"),
        ("mask_scope", "element mask.* not supported on FSDP2"),
        ("no_model", "DTensor parameters but no model"),
        ("tensor_parallel", "tensor parallelism .* not supported"),
        ("sharded_after_sam", "became DTensors after SAM was built.*build SAM after fully_shard"),
        ("shards_as_backward_inputs", "none of the perturbed FSDP2 shards has a gradient.*ascent_inputs"),
    ],
)
def test_unsupported_sharded_setups_are_refused(results, name, message):
    import re

    record = _case(results, "refusals")
    assert record[name] is not None, f"{name} was accepted"
    assert re.search(message, record[name]), record[name]
    if name in ("no_model", "tensor_parallel", "sharded_after_sam"):
        assert "fully_shard" in record[name]  # names what works


# --- refusals that need no process group -----------------------------------------------------------



def test_deepspeed_zero_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[1].weight.ds_id = 0  # what ZeRO-3 puts on the parameters it partitions
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*fully_shard"):
        normsam.SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)


def test_deepspeed_engine_is_refused():
    class DeepSpeedEngine(nn.Module):  # matched by class name: normsam does not import deepspeed
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))

    with pytest.raises(ValueError, match="DeepSpeed"):
        normsam.SAM(DeepSpeedEngine(), torch.optim.SGD, rho=0.5, lr=0.1)


def test_fsdp1_flat_parameters_are_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    for p in model.parameters():
        p._fsdp_flattened = True  # what FSDP1 marks its managed parameters with
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        normsam.SAM(list(model.parameters()), torch.optim.SGD, rho=0.5, lr=0.1)


def test_sam_trainer_refuses_accelerate_fsdp_when_built(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from normsam.integrations.transformers import SAMTrainer
    from tests.test_integration_transformers import TokenData, arguments, llama

    args = arguments(tmp_path, fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    with pytest.raises(ValueError, match="does not support accelerate's FSDP.*fully_shard.*examples/fsdp_sam_on.py"):
        SAMTrainer(model=llama(), args=args, train_dataset=TokenData(), sam=dict(scope="norm", rho=0.5))
