"""SAMTrainer: SAM-ON with the cheap ascent inside the HuggingFace Trainer (tiny models built in code)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import normsam  # noqa: E402
from normsam.integrations.transformers import SAMTrainer  # noqa: E402

VOCAB = 64


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12, classify: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)
        self.classes = torch.randint(0, 2, (n,), generator=g)
        self.classify = classify

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.classes[i] if self.classify else self.ids[i]}


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def arguments(out, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, weight_decay=0.1, logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, optim="adamw_torch",
    )
    return TrainingArguments(**{**options, **overrides})


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def test_llama_trains_with_sam_on_bf16_accumulation_logs_and_checkpoints(tmp_path):
    model = llama()
    start = flat(model)
    trainer = SAMTrainer(
        model=model, args=arguments(tmp_path, bf16=True), train_dataset=TokenData(), sam=dict(rho=0.5)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step\\(\\) before .*optimizer.step\\(\\)")
        trainer.train()
    sam = trainer.sam
    assert isinstance(sam, normsam.SAM) and sam.scope == "norm"
    names = [n for g in sam.param_groups if g["perturb"] for n in g["param_names"]]
    assert names and all("norm" in n for n in names)  # SAM-ON: the RMSNorm weights only
    assert len(names) == 2 * 2 + 1
    # the Trainer's weight-decay groups survive: no decay on the norms
    assert all(g["weight_decay"] == 0.0 for g in sam.param_groups if g["perturb"])
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["sam_steps"] for entry in steps] == [1, 2, 3, 4]
    assert all(entry["sam_nonfinite_ascent_steps"] == 0 for entry in steps)
    assert [entry["learning_rate"] for entry in steps] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])  # linear
    assert trainer.state.global_step == 4
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    assert not sam.is_perturbed and not torch.equal(flat(model), start)


def test_resume_from_checkpoint_gives_the_uninterrupted_run(tmp_path):
    full = llama()
    SAMTrainer(model=full, args=arguments(tmp_path / "a"), train_dataset=TokenData(), sam=dict(rho=0.5)).train()

    resumed = llama()
    trainer = SAMTrainer(
        model=resumed, args=arguments(tmp_path / "b"), train_dataset=TokenData(), sam=dict(rho=0.5)
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    sam = trainer.sam
    assert sam.counters["sam_steps"] == 4  # 2 from the checkpoint, 2 more
    # the reloaded groups are SAM's and the base optimizer's at once, with the scheduler's learning rate
    assert sam.param_groups is sam.base_optimizer.param_groups is trainer.optimizer.param_groups
    assert all(g["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0]) for g in sam.param_groups)
    torch.testing.assert_close(flat(resumed), flat(full), rtol=0, atol=1e-6)


def test_a_rho_warmup_runs_through_the_trainer_and_resumes_mid_warmup(tmp_path):
    """sam=dict(rho_schedule=...) warms ρ up over the Trainer's steps; a checkpoint in the warm-up keeps its place."""
    def run(out, resume=None, **sam):
        trainer = SAMTrainer(model=llama(), args=arguments(out), train_dataset=TokenData(), sam=dict(rho=0.5, **sam))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    warm = run(tmp_path / "a", rho_schedule=normsam.RhoWarmup(8))  # 4 steps: ρ/8 … 4ρ/8
    assert warm.sam.param_groups[0]["rho"] == pytest.approx(0.5 * 4 / 8)
    resumed = run(tmp_path / "b", str(tmp_path / "a" / "checkpoint-2"), rho_schedule=normsam.RhoWarmup(8))
    assert resumed.sam.param_groups[0]["rho"] == pytest.approx(0.5 * 4 / 8)  # not restarted at step 0
    torch.testing.assert_close(flat(resumed.model), flat(warm.model), rtol=0, atol=1e-6)
    constant = run(tmp_path / "c")
    assert constant.sam.param_groups[0]["rho"] == 0.5
    assert not torch.allclose(flat(constant.model), flat(warm.model), rtol=0, atol=1e-6)


def test_accumulation_uses_the_whole_steps_ascent_gradient(tmp_path):
    """2 micro-batches of 2 = 1 batch of 4: a per-micro-batch ascent would differ."""
    accumulated, single = llama(), llama()
    common = dict(max_steps=2, save_strategy="no")
    SAMTrainer(
        model=accumulated, args=arguments(tmp_path / "a", **common), train_dataset=TokenData(), sam=dict(rho=2.0)
    ).train()
    SAMTrainer(
        model=single,
        args=arguments(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common),
        train_dataset=TokenData(),
        sam=dict(rho=2.0),
    ).train()
    # float32 summation order differs between 2x2 and 1x4; AdamW's g/sqrt(v) lifts that to ~3.4e-6 on a few
    # elements (transformers 5.24), while a 5% change of rho already moves the weights by ~3e-2.
    torch.testing.assert_close(flat(accumulated), flat(single), rtol=0, atol=2e-5)


def test_bert_perturbs_the_layernorms(tmp_path):
    model = bert()
    trainer = SAMTrainer(
        model=model, args=arguments(tmp_path, max_steps=2, save_strategy="no"), train_dataset=TokenData(classify=True),
        sam=dict(rho=0.5, perturbation="asam"),
    )
    trainer.train()
    names = [n for g in trainer.sam.param_groups if g["perturb"] for n in g["param_names"]]
    assert len(names) == 2 * (1 + 2 * 2)  # embeddings' LayerNorm + two per layer, weight and bias
    assert all("LayerNorm" in n for n in names)
    assert trainer.sam.counters["sam_steps"] == 2


def test_a_ready_sam_can_be_passed_and_other_optimizers_are_refused(tmp_path):
    model = bert()
    sam = normsam.SAM(model, torch.optim.SGD, lr=0.01, rho=0.5)
    trainer = SAMTrainer(
        model=model, args=arguments(tmp_path, max_steps=1, gradient_accumulation_steps=1, save_strategy="no"),
        train_dataset=TokenData(classify=True), optimizers=(sam, None),
    )
    trainer.train()
    assert trainer.sam is sam and sam.counters["sam_steps"] == 1
    with pytest.raises(ValueError, match=r"SAMTrainer got optimizers=\(AdamW, \.\.\.\), not a normsam\.SAM"):
        SAMTrainer(model=model, args=arguments(tmp_path), optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="sam= holds SAM's options"):
        SAMTrainer(model=model, args=arguments(tmp_path), sam=dict(model=model))


@pytest.mark.parametrize(("sam", "message"), [
    (dict(rhoo=0.5), r"Unknown option 'rhoo': SAM has no such option\. Did you mean 'rho'\?"),
    (dict(rho=0.5, sparsity=0.9), r"sparsity=0\.9: sparsity is only used by the element-mask scopes"),
    (dict(rho=-1.0), r"Invalid rho: -1\.0"),
    (dict(perturbation="asam"), r"rho is required: .*5-10 for SAM-ON"),
    (None, r"SAMTrainer needs SAM's options, at least its radius: sam=dict\(rho=0\.5\)"),
])
def test_sam_options_are_checked_when_the_trainer_is_built_not_when_it_trains(tmp_path, sam, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainer(model=llama(), args=arguments(tmp_path), train_dataset=TokenData(), sam=sam)


def test_a_sam_variant_trains_through_the_trainer(tmp_path, monkeypatch):
    """sam=dict(variant="gsam", ...): GSAM's descent rule acts in the base optimizer's step, once per step."""
    from normsam.optim.descent import GSAMDescent

    applied = []
    original = GSAMDescent.before_base_step
    monkeypatch.setattr(GSAMDescent, "before_base_step",
                        lambda self, *args: (applied.append(self.alpha), original(self, *args))[1])
    common = dict(max_steps=2, save_strategy="no")
    gsam, sam = llama(), llama()
    trainer = SAMTrainer(model=gsam, args=arguments(tmp_path / "a", **common), train_dataset=TokenData(),
                         sam=dict(variant="gsam", alpha=0.4, rho=0.05))
    trainer.train()
    assert trainer.sam.options.variant == "gsam" and "gsam(alpha=0.4)" in repr(trainer.sam)
    assert trainer.sam.counters["sam_steps"] == 2 and applied == [0.4, 0.4] and not trainer.sam.is_perturbed
    SAMTrainer(model=sam, args=arguments(tmp_path / "b", **common), train_dataset=TokenData(),
               sam=dict(rho=0.05)).train()
    assert torch.isfinite(flat(gsam)).all() and not torch.allclose(flat(gsam), flat(sam), rtol=0, atol=1e-6)


def test_a_multi_step_ascent_is_refused_with_the_reason(tmp_path):
    message = r"SAMTrainer does not support ascent_steps=2: a multi-step ascent evaluates the loss again"
    with pytest.raises(ValueError, match=message):  # sam=dict(...): when the Trainer is built
        SAMTrainer(model=llama(), args=arguments(tmp_path), train_dataset=TokenData(),
                   sam=dict(rho=0.5, ascent_steps=2))
    model = llama()
    ready = normsam.SAM(model, torch.optim.AdamW, lr=1e-2, rho=0.5, ascent_steps=2)
    with pytest.raises(ValueError, match=message):  # a ready SAM: when it is first checked
        SAMTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenData(), optimizers=(ready, None))


def test_a_descent_rule_on_several_processes_needs_sync_ascent():
    from normsam.integrations._checks import check_sam_options

    gsam = normsam.SAMOptions(rho=0.05, variant="gsam")
    with pytest.raises(ValueError, match=r"SAMTrainer: variant='gsam' on 2 processes needs sync_ascent=True"):
        check_sam_options(gsam, "SAMTrainer", world_size=2)
    check_sam_options(gsam.replace(sync_ascent=True), "SAMTrainer", world_size=2)
    check_sam_options(gsam, "SAMTrainer", world_size=1)
    check_sam_options(normsam.SAMOptions(rho=0.05, variant="friendly-sam"), "SAMTrainer", world_size=2)


def test_descent_over_all_gets_every_ascent_gradient(tmp_path, monkeypatch):
    from normsam.optim.descent import GSAMDescent

    seen = []
    original = GSAMDescent.remember
    monkeypatch.setattr(GSAMDescent, "remember",
                        lambda self, params, grads: (seen.append(sum(g is not None for g in grads)),
                                                     original(self, params, grads))[1])
    model = llama()
    SAMTrainer(model=model, args=arguments(tmp_path, max_steps=1, save_strategy="no"), train_dataset=TokenData(),
               sam=dict(variant="gsam", descent_over="all", rho=0.05)).train()
    assert seen == [sum(p.requires_grad for p in model.parameters())]
    from normsam.integrations._checks import check_sam_options  # sync_ascent averages the others' too: allowed

    check_sam_options(normsam.SAMOptions(rho=0.05, variant="gsam", descent_over="all", sync_ascent=True),
                      "SAMTrainer", world_size=2)
