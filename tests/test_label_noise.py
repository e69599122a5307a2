"""Label noise (``label_noise=p``) and the evaluation keys ``eval_every`` / ``eval_subset``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from normsam.train import checkpoint as ckpt
from normsam.train import data as D
from normsam.train.config import load_config
from normsam.train.loop import Trainer

TINY = dict(data="synthetic", image_size=8, subset=100, batch_size=50, eval_batch_size=256, epochs=3, threads=1,
            progress=False, norm_stats=False, model="resnet8", scope="none")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy, flipped = D.flip_labels(labels, 0.4, 10, seed=3)
    assert flipped.numel() == 400 and torch.equal(flipped, flipped.sort().values)
    changed = torch.nonzero(noisy != labels, as_tuple=True)[0]
    assert torch.equal(changed, flipped)  # every chosen label changes, no other does
    assert noisy.min() >= 0 and noisy.max() <= 9
    # the new class is uniform over the 9 others: each of the 9 offsets is drawn about 400/9 times
    offsets = (noisy[flipped] - labels[flipped]) % 10
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 20
    again, flipped_again = D.flip_labels(labels, 0.4, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(flipped_again, flipped)
    other, _ = D.flip_labels(labels, 0.4, 10, seed=4)
    assert not torch.equal(other, noisy)


def test_flip_labels_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"label_noise must be in \[0, 1\)"):
        D.flip_labels(torch.zeros(4, dtype=torch.long), 1.0, 10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        D.flip_labels(torch.zeros(4, dtype=torch.long), 0.5, 1)
    with pytest.raises(ValueError, match="label_noise must lie in"):
        load_config(None, {"label_noise": -0.1})


def test_load_data_noises_only_the_training_split():
    clean = D.load_data("synthetic", subset=200, val_split=0.25, seed=1, image_size=8)
    noisy = D.load_data("synthetic", subset=200, val_split=0.25, label_noise=0.3, seed=1, image_size=8)
    assert clean.noisy_indices is None
    assert torch.equal(noisy.test.labels, clean.test.labels)
    assert torch.equal(noisy.val.labels, clean.val.labels)
    assert torch.equal(noisy.train.images, clean.train.images)
    assert torch.equal(noisy.clean_labels, clean.train.labels)
    changed = torch.nonzero(noisy.train.labels != clean.train.labels, as_tuple=True)[0]
    assert torch.equal(changed, noisy.noisy_indices) and changed.numel() == round(0.3 * 150)


def test_run_folder_records_the_flipped_examples(tmp_path):
    cfg = load_config(None, {**TINY, "label_noise": 0.2, "epochs": 1, "out": str(tmp_path / "run")})
    Trainer(cfg).run()
    record = json.loads((tmp_path / "run" / ckpt.LABEL_NOISE).read_text())
    data = D.load_data("synthetic", subset=100, label_noise=0.2, seed=0, image_size=8)
    assert record["num_flipped"] == 20 == len(record["indices"])
    assert record["indices"] == data.noisy_indices.tolist()
    assert record["noisy_labels"] == data.train.labels[data.noisy_indices].tolist()
    assert all(a != b for a, b in zip(record["clean_labels"], record["noisy_labels"]))


def test_eval_every_scores_every_nth_epoch_and_always_the_last(tmp_path):
    cfg = load_config(None, {**TINY, "epochs": 5, "eval_every": 2, "val_split": 0.2, "out": str(tmp_path / "r")})
    summary = Trainer(cfg).run()
    rows = ckpt.read_jsonl(Path(tmp_path / "r") / ckpt.METRICS_JSONL)
    assert ["test_acc" in r for r in rows] == [False, True, False, True, True]
    assert ["val_acc" in r for r in rows] == [False, True, False, True, True]
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        load_config(None, {"eval_every": 0})


def test_eval_subset_scores_a_fixed_stratified_subset(tmp_path):
    cfg = load_config(None, {**TINY, "epochs": 1, "eval_subset": 40, "seed": 5, "out": str(tmp_path / "s")})
    trainer = Trainer(cfg)
    scored = trainer.eval_loaders["test"].dataset
    assert len(scored) == 40
    assert torch.bincount(scored.labels, minlength=10).tolist() == [4] * 10
    # the subset is drawn with seed 0 whatever the run's seed, so a sweep's runs score the same images
    full = trainer.data.test
    expected = full.take(D.stratified_subset_indices(full.labels, 40, 10, seed=0))
    assert torch.equal(scored.images, expected.images)
    with pytest.raises(ValueError, match="eval_subset must be >= 1"):
        load_config(None, {"eval_subset": 0})
