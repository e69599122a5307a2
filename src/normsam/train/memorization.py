"""Memorization of label noise: the flipped training examples as evaluation sets.

With ``label_noise > 0`` the runner scores, at every evaluation, the training examples whose label was
flipped (no augmentation, eval mode):

* ``flipped``: against the flipped label the model was trained on. Its accuracy is how much of the noise the
  model has memorized (chance level is 1/(classes − 1) of the wrong classes' share; 100% = all memorized);
* ``flipped_clean``: against their true label: how many of them the model still classifies correctly.

They appear in metrics.jsonl as ``flipped_acc``/``flipped_loss`` and ``flipped_clean_acc``/``flipped_clean_loss``
and in summary.json as ``final_flipped_acc``/``final_flipped_clean_acc``. Scoring them reads no random numbers
and changes no state, so a run trains the same with or without them (``memorization: false`` turns them off).
"""

from __future__ import annotations

from normsam.train.data import ArrayDataset, DataSplits

__all__ = ["flipped_eval_sets"]


def flipped_eval_sets(data: DataSplits) -> dict[str, ArrayDataset]:
    """``{"flipped": noisy labels, "flipped_clean": true labels}`` over the flipped training examples, or ``{}``
    without label noise."""
    flipped = data.noisy_indices
    if flipped is None or flipped.numel() == 0 or data.clean_labels is None:
        return {}
    images = data.train.images[flipped]
    return {"flipped": ArrayDataset(images, data.train.labels[flipped]),
            "flipped_clean": ArrayDataset(images, data.clean_labels[flipped])}
