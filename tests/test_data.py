"""Tests for normsam.train.data: IDX reading, data set search, splits, batch augmentation, the loader.

No real data set is needed: Fashion-MNIST-format IDX files, a CIFAR-10 pickle folder and a PNG image
folder are written into ``tmp_path``, and the system search path is monkeypatched away.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normsam.train import data as D
from normsam.train.data import (
    AUGMENTS,
    DATASETS,
    ArrayDataset,
    BatchAugment,
    BatchLoader,
    CorruptDataError,
    DatasetNotFoundError,
    Normalize,
    load_data,
    make_augment,
    read_idx,
    stratified_split_indices,
    stratified_subset_indices,
)

N_TRAIN, N_TEST = 40, 20  # 4 and 2 examples per class


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_arrays(n: int, seed: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28×28 images, labels cycling 0..9; pixel (0, 0) holds ``offset + index`` to identify images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = (offset + np.arange(n)) % 256
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_fashion_mnist(folder: Path, *, gz: bool = True, n_train: int = N_TRAIN, n_test: int = N_TEST,
                        seed: int = 0) -> dict[str, np.ndarray]:
    suffix = ".gz" if gz else ""
    tr_x, tr_y = make_idx_arrays(n_train, seed)
    te_x, te_y = make_idx_arrays(n_test, seed + 1, offset=100)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", tr_x)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", tr_y)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", te_x)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", te_y)
    return {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y}


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path, monkeypatch):
    """No $NORMSAM_DATA, and a Debian path that does not exist (unless a test writes into it)."""
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)
    fake_system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(D.readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (fake_system,), "mnist": ()})
    return fake_system


@pytest.fixture
def fmnist_dir(tmp_path) -> Path:
    folder = tmp_path / "fm"
    write_fashion_mnist(folder)
    return folder


def image_ids(ds: ArrayDataset) -> list[int]:
    return ds.images[:, 0, 0, 0].tolist()


# --------------------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_values_and_shapes(tmp_path, gz):
    images, labels = make_idx_arrays(7, seed=3)
    suffix = ".gz" if gz else ""
    x = read_idx(write_idx(tmp_path / f"img{suffix}", images))
    y = read_idx(write_idx(tmp_path / f"lbl{suffix}", labels))
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28)
    assert y.shape == (7,)
    assert torch.equal(x, torch.from_numpy(images))
    assert torch.equal(y, torch.from_numpy(labels))


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000]], dtype=">i4")
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 1, 3) + values.tobytes())
    assert read_idx(path).tolist() == [[1, -2, 70000]]


def test_read_idx_rejects_corrupt_files(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(CorruptDataError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(CorruptDataError, match="truncated"):
        read_idx(truncated)
    not_gzip = tmp_path / "x-idx1-ubyte.gz"
    not_gzip.write_bytes(b"this is not gzip data")
    with pytest.raises(CorruptDataError, match="cannot read"):
        read_idx(not_gzip)


def test_label_count_mismatch_is_reported(tmp_path):
    folder = tmp_path / "fm"
    write_fashion_mnist(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match="should hold 40 labels"):
        load_data("fashion-mnist", data_dir=folder)


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST search
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_layouts(tmp_path, layout, gz):
    root = tmp_path / "root"
    arrays = write_fashion_mnist(root / layout if layout else root, gz=gz)
    splits = load_data("fashion-mnist", data_dir=root)
    assert splits.train.images.shape == (N_TRAIN, 1, 28, 28)
    assert splits.test.images.shape == (N_TEST, 1, 28, 28)
    assert splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train_x"]))
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["test_y"]).long())
    assert splits.val is None
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert splits.mean == (0.2860,) and splits.std == (0.3530,)
    assert splits.name == "fashion-mnist" and splits.classes[0] == "T-shirt/top" and len(splits.classes) == 10


def test_mnist_layout_and_stats(tmp_path):
    write_fashion_mnist(tmp_path / "root" / "MNIST" / "raw")
    splits = load_data("mnist", data_dir=tmp_path / "root")
    assert splits.name == "mnist" and splits.mean == (0.1307,) and splits.std == (0.3081,)
    assert splits.classes == [str(d) for d in range(10)]


def test_search_order_data_dir_then_env_then_system(tmp_path, monkeypatch, isolated_search_path):
    given, env, system = tmp_path / "given", tmp_path / "env", isolated_search_path
    write_fashion_mnist(given, n_train=30)
    write_fashion_mnist(env / "FashionMNIST" / "raw", n_train=20)
    write_fashion_mnist(system, n_train=10)
    monkeypatch.setenv(D.DATA_ENV_VAR, str(env))
    assert len(load_data("fashion-mnist", data_dir=given).train) == 30
    assert len(load_data("fashion-mnist").train) == 20
    monkeypatch.delenv(D.DATA_ENV_VAR)
    splits = load_data("fashion-mnist")
    assert len(splits.train) == 10 and splits.source == str(system)


@pytest.mark.parametrize("given", ["empty", "does/not/exist"])
def test_explicit_data_dir_without_the_files_is_an_error_not_a_substitute(tmp_path, monkeypatch,
                                                                           isolated_search_path, given):
    """Data in $NORMSAM_DATA or the system path must not stand in for an explicit data_dir (it used to)."""
    write_fashion_mnist(isolated_search_path)
    write_fashion_mnist(tmp_path / "env")
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="explicit data_dir is the only place searched") as info:
        load_data("fashion-mnist", data_dir=tmp_path / given)
    message = str(info.value)
    assert f"{tmp_path / given}  (data_dir" in message
    assert f"{tmp_path / given / 'FashionMNIST' / 'raw'}  (data_dir" in message
    assert str(isolated_search_path) not in message and str(tmp_path / "env") not in message
    assert f"{tmp_path / given}  (data_dir{')' if given == 'empty' else ', does not exist)'}" in message
    assert "leave data_dir unset" in message
    assert load_data("fashion-mnist").source == str(tmp_path / "env")  # without data_dir the search goes on


def test_missing_fashion_mnist_error_lists_places_and_remedies(tmp_path, monkeypatch, isolated_search_path):
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "envroot"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_data("fashion-mnist")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "download=true" in message
    for place in (
        tmp_path / "envroot",
        tmp_path / "envroot" / "fashion-mnist",
        tmp_path / "envroot" / "FashionMNIST" / "raw",
        isolated_search_path,
    ):
        assert f"{place}  (" in message


def test_explicit_cifar_data_dir_is_the_only_place_searched(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path / "env")
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError, match="not found") as info:
        load_data("cifar10", data_dir=tmp_path / "given")
    assert str(tmp_path / "env") not in str(info.value)


def test_missing_mnist_error_says_no_debian_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download=true") as info:
        load_data("mnist", data_dir=tmp_path)
    assert "no Debian" in str(info.value) and "apt-get" not in str(info.value)


def test_partial_folder_is_mentioned(tmp_path):
    folder = tmp_path / "fm"
    write_fashion_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_data("fashion-mnist", data_dir=folder)


def test_unknown_names_and_bad_arguments(fmnist_dir):
    with pytest.raises(ValueError, match="valid names are: fashion-mnist, mnist, cifar10"):
        load_data("imagenet-22k")
    with pytest.raises(ValueError, match="image_size"):
        load_data("fashion-mnist", data_dir=fmnist_dir, image_size=32)
    with pytest.raises(ValueError, match="val_split"):
        load_data("fashion-mnist", data_dir=fmnist_dir, val_split=1.0)
    assert load_data("Fashion_MNIST", data_dir=fmnist_dir).name == "fashion-mnist"
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"}


# --------------------------------------------------------------------------------------------------------
# Subsets and validation splits
# --------------------------------------------------------------------------------------------------------


def test_stratified_subset_counts_and_determinism(fmnist_dir):
    a = load_data("fashion-mnist", data_dir=fmnist_dir, subset=25, seed=1)
    counts = torch.bincount(a.train.labels, minlength=10).tolist()
    assert counts == [3] * 5 + [2] * 5  # 25 = 10 * 2 + 5, remainder to the lowest classes
    b = load_data("fashion-mnist", data_dir=fmnist_dir, subset=25, seed=1)
    assert image_ids(a.train) == image_ids(b.train)
    c = load_data("fashion-mnist", data_dir=fmnist_dir, subset=25, seed=2)
    assert image_ids(a.train) != image_ids(c.train)
    assert len(a.test) == N_TEST  # the test set is never subsetted


def test_subset_bounds(fmnist_dir):
    with pytest.raises(ValueError, match="larger than the training set"):
        load_data("fashion-mnist", data_dir=fmnist_dir, subset=41)
    with pytest.raises(ValueError, match="at least one example per class"):
        load_data("fashion-mnist", data_dir=fmnist_dir, subset=9)


def test_subset_redistributes_when_a_class_is_short():
    labels = torch.tensor([0] * 1 + [1] * 10 + [2] * 10)
    idx = stratified_subset_indices(labels, 9, 3, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [1, 4, 4]
    assert len(set(idx.tolist())) == 9


def test_val_split_disjoint_stratified_and_deterministic(fmnist_dir):
    a = load_data("fashion-mnist", data_dir=fmnist_dir, val_split=0.25, seed=3)
    assert a.val is not None
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [1] * 10
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [3] * 10
    train_ids, val_ids = set(image_ids(a.train)), set(image_ids(a.val))
    assert not train_ids & val_ids and len(train_ids | val_ids) == N_TRAIN
    b = load_data("fashion-mnist", data_dir=fmnist_dir, val_split=0.25, seed=3)
    assert image_ids(a.val) == image_ids(b.val)


def test_val_split_after_subset(fmnist_dir):
    s = load_data("fashion-mnist", data_dir=fmnist_dir, subset=30, val_split=1 / 3)
    assert len(s.train) + len(s.val) == 30
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [1] * 10


def test_split_indices_function():
    labels = torch.arange(100) % 4
    train, val = stratified_split_indices(labels, 0.2, 4, seed=0)
    assert len(val) == 20 and torch.bincount(labels[val]).tolist() == [5] * 4
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="empty validation set"):
        stratified_split_indices(torch.arange(10), 0.01, 10)


# --------------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_stats():
    a = load_data("synthetic", synthetic_size=(100, 30), seed=5)
    assert a.train.images.shape == (100, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.test.images.shape == (30, 3, 32, 32)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, 32)
    b = load_data("synthetic", synthetic_size=(100, 30), seed=5)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    c = load_data("synthetic", synthetic_size=(100, 30), seed=6)
    assert not torch.equal(a.train.images, c.train.images)
    x = a.train.images.double() / 255
    assert a.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert a.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-4)
    small = load_data("synthetic", synthetic_size=(20, 10), image_size=16)
    assert small.train.images.shape == (20, 3, 16, 16) and small.image_size == 16


def test_synthetic_classes_are_separable():
    """Nearest class mean (of the training set) classifies the test set far above chance."""
    s = load_data("synthetic", synthetic_size=(500, 200))
    x_tr, x_te = s.train.images.float().flatten(1), s.test.images.float().flatten(1)
    means = torch.stack([x_tr[s.train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(x_te, means).argmin(1)
    assert (pred == s.test.labels).float().mean() > 0.9


# --------------------------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------------------------


def test_array_dataset_validation():
    ok = ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    assert len(ok) == 3
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# BatchAugment
# --------------------------------------------------------------------------------------------------------


def random_batch(n=16, c=3, h=8, w=10, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def reference_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def test_batch_augment_shape_dtype():
    out = BatchAugment(MEAN, STD)(random_batch(), torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 8, 10) and out.dtype == torch.float32


def test_crop_and_flip_match_a_per_sample_reference_loop():
    x = random_batch()
    aug = BatchAugment(MEAN, STD, crop_padding=3, flip=True)
    out, params = aug(x, torch.Generator().manual_seed(1), return_params=True)
    assert params.flipped.any() and not params.flipped.all()  # both cases are exercised
    assert params.offset_y.min() >= 0 and params.offset_y.max() <= 6
    expected = []
    for k in range(len(x)):  # plain per-sample reference
        padded = torch.zeros(3, 8 + 6, 10 + 6, dtype=torch.uint8)
        padded[:, 3:-3, 3:-3] = x[k]
        oy, ox = int(params.offset_y[k]), int(params.offset_x[k])
        crop = padded[:, oy:oy + 8, ox:ox + 10]
        expected.append(crop.flip(-1) if params.flipped[k] else crop)
    assert torch.allclose(out, reference_normalize(torch.stack(expected)), atol=1e-5)


def test_crop_only_never_flips_and_pads_with_zeros():
    x = torch.full((64, 1, 6, 6), 200, dtype=torch.uint8)
    aug = BatchAugment((0.0,), (1.0,), crop_padding=2, flip=False)
    out, params = aug(x, torch.Generator().manual_seed(0), return_params=True)
    assert not params.flipped.any()
    assert out.unique().tolist() == pytest.approx([0.0, 200 / 255])
    shifted = (params.offset_y != 2) | (params.offset_x != 2)
    assert ((out == 0).flatten(1).any(1) == shifted).all()  # zeros exactly where the crop is shifted


def test_flip_only_mirrors_selected_samples():
    x = random_batch(n=32)
    aug = BatchAugment(MEAN, STD, crop_padding=0, flip=True)
    out, params = aug(x, torch.Generator().manual_seed(2), return_params=True)
    expected = torch.where(params.flipped.view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.allclose(out, reference_normalize(expected), atol=1e-5)


def test_normalization_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    out = make_augment("none", _splits_with_stats(MEAN, STD))(x, None)
    assert torch.allclose(out, reference_normalize(x), atol=1e-6)
    assert out[2, 0, 0, 0].item() == pytest.approx((1.0 - 0.5) / 0.2, abs=1e-5)
    assert torch.allclose(Normalize(MEAN, STD)(x), out)


def test_augment_is_deterministic_under_the_same_generator_seed():
    x = random_batch()
    aug = BatchAugment(MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_autoaugment_is_deterministic_and_leaves_global_rng_alone():
    x = random_batch(n=6, h=32, w=32)
    aug = BatchAugment(MEAN, STD, autoaugment=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    b = aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)


def test_random_augment_requires_a_generator():
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        BatchAugment(MEAN, STD)(random_batch(), None)
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(MEAN, STD)(random_batch().float(), torch.Generator())


def _splits_with_stats(mean, std, name="cifar10") -> D.DataSplits:
    empty = ArrayDataset(torch.zeros(1, len(mean), 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    return D.DataSplits(empty, None, empty, 10, len(mean), 2, tuple(mean), tuple(std), name, [])


def test_make_augment_presets():
    splits = _splits_with_stats(MEAN, STD)
    none = make_augment("none", splits)
    assert (none.crop_padding, none.flip, none.autoaugment, none.is_random) == (0, False, False, False)
    crop = make_augment("crop", splits)
    assert (crop.crop_padding, crop.flip, crop.autoaugment) == (4, False, False)
    cf = make_augment("crop-flip", splits)
    assert (cf.crop_padding, cf.flip, cf.autoaugment) == (4, True, False)
    aa = make_augment("autoaugment", splits)
    assert (aa.crop_padding, aa.flip, aa.autoaugment) == (4, True, True)
    assert aa.normalize.mean == MEAN and aa.normalize.std == STD
    with pytest.raises(ValueError, match="valid presets are: none, crop, crop-flip, autoaugment"):
        make_augment("mixup", splits)
    assert AUGMENTS == ("none", "crop", "crop-flip", "autoaugment")


def test_make_augment_warns_about_flipping_digits():
    with pytest.warns(UserWarning, match="wrong for MNIST"):
        make_augment("crop-flip", _splits_with_stats((0.1307,), (0.3081,), name="mnist"))


# --------------------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------------------


def id_dataset(n: int) -> ArrayDataset:
    """Image k has every pixel equal to k (k < 256), so a batch tells which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ArrayDataset(images, torch.arange(n) % 10)


def batch_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_loader_covers_every_sample_once_per_epoch():
    loader = BatchLoader(id_dataset(23), 5, shuffle=True, augment=None, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    ids = [i for x, _ in batches for i in batch_ids(x)]
    assert sorted(ids) == list(range(23))
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    assert y.tolist() == [i % 10 for i in batch_ids(x)]


def test_loader_drop_last_and_no_shuffle():
    loader = BatchLoader(id_dataset(23), 5, shuffle=False, augment=None, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [i for x, _ in batches for i in batch_ids(x)] == list(range(20))


def test_set_epoch_makes_batches_a_function_of_seed_and_epoch():
    ds = id_dataset(40)
    aug = BatchAugment((0.0,), (1.0,), crop_padding=1, flip=True)

    def run(epoch: int, loader: BatchLoader | None = None) -> list[torch.Tensor]:
        loader = loader or BatchLoader(ds, 8, shuffle=True, augment=aug, seed=9)
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    uninterrupted = BatchLoader(ds, 8, shuffle=True, augment=aug, seed=9)
    for epoch in range(3):
        a = run(epoch, uninterrupted)
    resumed = run(2)  # a fresh loader, as after a restart
    assert all(torch.equal(p, q) for p, q in zip(a, resumed))
    other = run(3)
    order = lambda xs: [i for x in xs for i in batch_ids(x[:, :, 1:-1, 1:-1])]  # noqa: E731
    assert order(a) != order(other)


def test_ddp_shards_are_disjoint_and_equally_long():
    ds = id_dataset(40)
    loaders = [BatchLoader(ds, 3, shuffle=True, augment=None, rank=r, world_size=4, seed=2) for r in range(4)]
    for loader in loaders:
        loader.set_epoch(1)
    shards = [[i for x, _ in loader for i in batch_ids(x)] for loader in loaders]
    assert all(len(s) == 10 for s in shards) and len({len(loader) for loader in loaders}) == 1
    assert sorted(i for s in shards for i in s) == list(range(40))


def test_ddp_pads_by_wrapping_when_not_divisible():
    ds = id_dataset(10)
    loaders = [BatchLoader(ds, 2, shuffle=True, augment=None, rank=r, world_size=4) for r in range(4)]
    shards = [loader.indices().tolist() for loader in loaders]
    assert [len(s) for s in shards] == [3] * 4 and len({len(loader) for loader in loaders}) == 1
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(10)) and len(flat) == 12


def test_loader_validation_errors():
    ds = id_dataset(10)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0, shuffle=True, augment=None)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        BatchLoader(ds, 2, shuffle=True, augment=None, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 2, shuffle=True, augment=None, rank=-1)


# --------------------------------------------------------------------------------------------------------
# Image folders and CIFAR
# --------------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, classes=("cat", "dog"), per_split=(("train", 3), ("val", 2))) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_split:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((30, 40, 3), 60 + 120 * c, dtype=np.uint8)
                pixels += rng.integers(0, 20, size=pixels.shape, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_loads_resized_uint8(tmp_path):
    write_image_folder(tmp_path / "imgs")
    s = load_data("imagefolder", data_dir=tmp_path / "imgs", image_size=16)
    assert s.train.images.shape == (6, 3, 16, 16) and s.train.images.dtype == torch.uint8
    assert s.test.images.shape == (4, 3, 16, 16)
    assert s.classes == ["cat", "dog"] and s.num_classes == 2 and s.image_size == 16
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.train.images[s.train.labels == 1].float().mean() > s.train.images[s.train.labels == 0].float().mean()
    assert len(s.mean) == 3 and all(0 < m < 1 for m in s.mean)


def test_imagefolder_test_dir_and_errors(tmp_path):
    write_image_folder(tmp_path / "a", per_split=(("train", 2), ("test", 1)))
    assert len(load_data("imagefolder", data_dir=tmp_path / "a", image_size=8).test) == 2
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="val/ or test/: False"):
        load_data("imagefolder", data_dir=tmp_path / "b")
    with pytest.raises(DatasetNotFoundError, match="needs data_dir"):
        load_data("imagefolder")
    write_image_folder(tmp_path / "c", per_split=(("train", 1),))
    write_image_folder(tmp_path / "c", classes=("cat", "cow"), per_split=(("val", 1),))
    with pytest.raises(ValueError, match="same class sub-folders"):
        load_data("imagefolder", data_dir=tmp_path / "c", image_size=8)


def write_fake_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        rows.append(data)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10 for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return np.concatenate(rows[:5])


def test_cifar10_conversion_from_a_fake_pickle_folder(tmp_path, monkeypatch):
    """torchvision md5-checks the CIFAR files on every load (even with download=False), so a fake folder
    only loads with that check patched out; the check itself is torchvision's business, not ours."""
    import torchvision.datasets.cifar as tv_cifar

    train_rows = write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="md5"):
        load_data("cifar10", data_dir=tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    s = load_data("cifar10", data_dir=tmp_path)
    assert s.train.images.shape == (20, 3, 32, 32) and s.test.images.shape == (4, 3, 32, 32)
    assert torch.equal(s.train.images, torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)))
    assert s.classes == [f"c{i}" for i in range(10)] and s.mean == (0.4914, 0.4822, 0.4465)


def test_missing_cifar_names_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download=true"):
        load_data("cifar100", data_dir=tmp_path)
