"""Integrations with training frameworks; each submodule needs its framework, installed as an extra.

- :mod:`normsam.integrations.transformers`: ``SAMTrainer``, a HuggingFace ``Trainer`` that trains with SAM
  (SAM-ON by default) and the cheap ascent (``pip install "normsam[transformers]"``).
- :mod:`normsam.integrations.lightning`: ``SAMModule``, a ``LightningModule`` mixin for SAM with the cheap
  ascent under automatic optimization (``pip install "normsam[lightning]"``).

The submodules are not imported here, so ``import normsam`` never needs either framework.
"""
