"""The data layer of the training runner: in-memory data sets, batch augmentation, and a loader.

Design
------
* **Everything in memory, as uint8 tensors.** Every supported data set is small enough (Fashion-MNIST,
  MNIST, CIFAR-10/100, small image folders, synthetic data) to be held as one ``N×C×H×W`` uint8 tensor plus
  an ``N`` int64 label tensor (:class:`ArrayDataset`). uint8 keeps memory and host→device copies 4× smaller
  than float32; conversion to float happens per batch.
* **Augment whole batches, not single images.** With two CPU cores a per-image Python transform pipeline
  (PIL → crop → flip → tensor) starves the model. :class:`BatchAugment` does the random crop (zero padding,
  then per-sample offsets gathered with one vectorized index) and the random horizontal flip (one
  ``torch.where``) for the whole batch at once, then normalizes. AutoAugment is the exception: it is applied
  per image, because torchvision draws one policy per call; it is optional.
* **Randomness is a pure function of seeds.** Subsets and validation splits depend only on ``seed``;
  :class:`BatchLoader` draws each epoch's permutation from ``(seed, epoch)`` and each epoch's augmentation
  from ``(seed, epoch, rank)``, so a run resumed at an epoch boundary sees exactly the batches an
  uninterrupted run would. Augmentation draws its random numbers from an explicit ``torch.Generator``,
  never from the global RNG (AutoAugment, which only knows the global RNG, runs inside a forked RNG state
  seeded from that generator).
* **No silent substitution.** An unknown data set name is an error, and a data set that cannot be found
  raises :class:`DatasetNotFoundError` that lists every place searched and how to get the data; the runner
  never falls back to another (or synthetic) data set.

Data sets
---------
``"fashion-mnist"`` (the default) and ``"mnist"`` are read from the four IDX files (plain or ``.gz``) by a
small reader of our own (:func:`read_idx`). Fashion-MNIST is searched in ``data_dir`` when one is given
(and nowhere else), otherwise in ``$NORMSAM_DATA``, then ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``); in each
root the files may sit directly in the root, in ``root/fashion-mnist/`` or in torchvision's layout
``root/FashionMNIST/raw/``. MNIST is searched the same way (``root/mnist/``, ``root/MNIST/raw/``) but has no
system path. With ``download=True`` and nothing found, torchvision downloads the files into
``data_dir`` (or ``./data``); calling again with ``download=True`` reuses them without downloading.

``"cifar10"``/``"cifar100"`` use torchvision's pickled format (``root/cifar-10-batches-py``,
``root/cifar-100-python``), which torchvision md5-checks on every load.

``"imagefolder"`` reads ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``) with
torchvision's ``ImageFolder``, resizing each image (shorter side, then centre crop) to ``image_size``
(default 64). It decodes every image into memory up front, so it is meant for small folders (ImageNet
subsets such as Imagenette at low resolution). Full ImageNet is streamed instead: ``loader=stream`` reads such a
folder per sample, and ``"webdataset"`` reads tar shards written by ``normsam make-shards`` (both in
:mod:`normsam.train.data.streamed`, not through :func:`load_data`).

The class count and image shape of ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` and ``"cifar100"`` are fixed
by their definition and held in one table, :data:`KNOWN_SHAPES` (``DataShape(num_classes, in_channels,
image_size)``): ``normsam train --dry-run`` plans with it before the files are on disk, and :func:`load_data`
refuses files that do not match it. An image that cannot be read or does not decode is a
:class:`CorruptDataError` naming the file, wherever it is read (``readers.decode_image`` is the one decoder).

``"synthetic"`` is deterministic, learnable, class-conditional data for tests and benchmarks: one smooth
random prototype image per class plus per-sample noise.

Modules
-------
``containers`` (:class:`ArrayDataset`, :class:`DataSplits`, the errors), ``readers`` (the file readers),
``splits`` (subsets, label noise, validation splits), ``augment`` (batch augmentation), ``memory`` (the
in-memory :class:`BatchLoader`), ``load`` (:func:`load_data`), ``streamed`` (per-sample decoding in loader
workers: webdataset shards and streamed image folders) and ``make_shards`` (``normsam make-shards``). The
user-facing names of the first six are re-exported here; the helpers they share (``splits.derive_data_seed``,
``containers.describe_value``, the readers' loaders) are imported from their modules.

Augmentation presets
--------------------
``"none"`` (normalize only; also the evaluation path), ``"crop"``, ``"crop-flip"``, ``"autoaugment"``
(crop-flip + AutoAugment with the CIFAR-10 policy). Horizontal flips suit clothes (Fashion-MNIST) and
natural images (CIFAR, ImageNet) but are wrong for digits: a mirrored 2, 3, 4, 5, 7 or 9 is not that digit,
so do not use ``"crop-flip"`` or ``"autoaugment"`` with MNIST (:func:`make_augment` warns).
"""

from normsam.train.data import augment, containers, load, memory, readers, splits
from normsam.train.data.augment import AUGMENTS, AugmentParams, BatchAugment, Normalize, make_augment
from normsam.train.data.containers import ArrayDataset, CorruptDataError, DatasetNotFoundError, DataSplits
from normsam.train.data.load import DATASETS, KNOWN_SHAPES, DataShape, load_data
from normsam.train.data.memory import BatchLoader
from normsam.train.data.readers import DATA_ENV_VAR, DEBIAN_FASHION_MNIST_DIR, SYSTEM_SEARCH_DIRS, read_idx
from normsam.train.data.splits import flip_labels, stratified_split_indices, stratified_subset_indices

__all__ = [
    "DATASETS",
    "KNOWN_SHAPES",
    "DataShape",
    "AUGMENTS",
    "DATA_ENV_VAR",
    "DEBIAN_FASHION_MNIST_DIR",
    "SYSTEM_SEARCH_DIRS",
    "DatasetNotFoundError",
    "CorruptDataError",
    "ArrayDataset",
    "DataSplits",
    "AugmentParams",
    "Normalize",
    "BatchAugment",
    "BatchLoader",
    "load_data",
    "read_idx",
    "make_augment",
    "stratified_subset_indices",
    "flip_labels",
    "stratified_split_indices",
]
