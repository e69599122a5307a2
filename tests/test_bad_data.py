"""Nothing silently wrong, round 3: bad data ends in one line that names the file (in memory, in loader workers,
in make-shards, whose rerun must work), and a dry run without the data plans the data set's real shape.

No real data set is needed: image folders, shards, IDX files and CIFAR pickle folders are written into tmp_path.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normsam import cli
from normsam.train.config import load_config
from normsam.train.data import KNOWN_SHAPES, CorruptDataError, DatasetNotFoundError, load_data
from normsam.train.data import readers
from normsam.train.data.make_shards import STAGING, make_shards
from normsam.train.data.streamed import StreamedLoader, load_streamed_data, make_streamed_loaders
from normsam.train.plan import plan_run
from tests.test_data import write_fake_cifar10, write_fashion_mnist, write_idx
from tests.test_streamed import TINY, write_image_folder


@pytest.fixture(autouse=True)
def no_data_on_the_search_path(tmp_path, monkeypatch):
    """No $NORMSAM_DATA and no Debian Fashion-MNIST: "missing" means missing on every machine."""
    monkeypatch.delenv(readers.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(readers, "SYSTEM_SEARCH_DIRS", {"fashion-mnist": (tmp_path / "no-system-copy",), "mnist": ()})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _cfg(**kw):
    return load_config(None, {**TINY, **kw})


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _with_bad_files(image_folder: Path, root: Path, **bad: bytes) -> Path:
    """A copy of ``image_folder`` with ``train/class1/<name>`` files holding ``bad`` bytes."""
    shutil.copytree(image_folder, root)
    for name, data in bad.items():
        (root / "train" / "class1" / name.replace("_", ".")).write_bytes(data)
    return root


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"normsam {command}: error: "), err
    return lines[0]


# --- 1a. the in-memory image folder ------------------------------------------------------------------------


def test_undecodable_images_of_an_in_memory_image_folder_are_one_line_naming_each(image_folder, tmp_path, capsys):
    """Used to be PIL's 37-line traceback (exit 1) from inside torchvision's ImageFolder."""
    good = _jpeg_bytes()
    root = _with_bad_files(image_folder, tmp_path / "imgs", bad_jpg=np.random.default_rng(1).bytes(500),
                           truncated_jpg=good[: len(good) // 2], empty_png=b"")
    with pytest.raises(CorruptDataError, match=r"3 of 34 images in .*train do not decode: .*bad\.jpg \("
                                               r"UnidentifiedImageError.*empty\.png.*truncated\.jpg \(OSError: image "
                                               r"file is truncated.*Remove or replace them.*--skip-corrupt"):
        load_data("imagefolder", data_dir=root, image_size=8)
    assert cli.main(["train", "data=imagefolder", f"data_dir={root}", "image_size=8", "model=resnet8", "epochs=1",
                     "device=cpu", "progress=false", f"out={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys, "train")
    assert "bad.jpg" in line and "truncated.jpg" in line and "Traceback" not in line
    # the dry run reads the data too: the same line, not a traceback
    assert cli.main(["train", "data=imagefolder", f"data_dir={root}", "--dry-run"]) == 2
    assert "bad.jpg" in _one_error_line(capsys, "train")


def test_more_than_three_bad_images_are_counted_and_a_good_folder_loads_as_before(image_folder, tmp_path):
    root = _with_bad_files(image_folder, tmp_path / "imgs", **{f"b{i}_jpg": b"x" for i in range(5)})
    with pytest.raises(CorruptDataError, match=r"5 of 36 images .*b2\.jpg .*; and 2 more\."):
        load_data("imagefolder", data_dir=root, image_size=8)
    # decoding through our reader gives torchvision's default loader's pixels
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    s = load_data("imagefolder", data_dir=image_folder, image_size=12)
    tf = T.Compose([T.Resize(12), T.CenterCrop(12), T.PILToTensor()])
    reference = tvd.ImageFolder(str(image_folder / "train"), transform=tf)
    assert torch.equal(s.train.images, torch.stack([reference[i][0] for i in range(len(reference))]))


# --- 1b. loader workers ----------------------------------------------------------------------------------------


def _first_error(loader) -> BaseException:
    with pytest.raises(Exception) as info:
        list(loader)
    return info.value


def test_bad_data_in_loader_workers_is_the_same_one_line_as_in_the_main_process(image_folder, tmp_path):
    """Used to be torch's "Caught CorruptDataError in DataLoader worker process 0. Original Traceback ..."."""
    root = _with_bad_files(image_folder, tmp_path / "imgs", zz_broken_jpg=b"not an image")
    errors = {}
    for workers in (0, 2):
        cfg = _cfg(data="imagefolder", loader="stream", data_dir=str(root), augment="none", loader_workers=workers)
        loader = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=0, world_size=1, batch_size=64,
                                       device=torch.device("cpu"))[0]
        errors[workers] = _first_error(loader)
    assert type(errors[2]) is type(errors[0]) is CorruptDataError
    assert str(errors[2]) == str(errors[0]) and "zz.broken.jpg: the image does not decode" in str(errors[2])
    assert "\n" not in str(errors[2]) and "Caught" not in str(errors[2])


def test_a_damaged_shard_read_by_workers_is_the_same_one_line_as_in_the_main_process(image_folder, tmp_path):
    shards = tmp_path / "shards"
    make_shards(image_folder, shards, shard_size=7, progress=False)
    victim = shards / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:700])  # cut inside its first sample
    errors = {}
    for workers in (0, 2):
        cfg = _cfg(data="webdataset", data_dir=str(shards), augment="none", loader_workers=workers, shuffle_buffer=1)
        loader = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=0, world_size=1, batch_size=4,
                                       device=torch.device("cpu"))[0]
        loader.set_epoch(0)
        errors[workers] = _first_error(loader)
    assert type(errors[2]) is type(errors[0]) is CorruptDataError
    assert str(errors[2]) == str(errors[0]) and "train-000001.tar is damaged" in str(errors[2])
    assert "Caught" not in str(errors[2])


def test_the_worker_case_through_the_command_line_is_one_line(image_folder, tmp_path, capsys):
    root = _with_bad_files(image_folder, tmp_path / "imgs", zz_broken_jpg=b"not an image")
    assert cli.main(["train", "data=imagefolder", "loader=stream", f"data_dir={root}", "image_size=16",
                     "model=resnet8", "epochs=1", "batch_size=4", "device=cpu", "progress=false", "threads=1",
                     "norm_stats=false", f"out={tmp_path / 'run'}"]) == 2  # loader_workers: the default 2
    line = _one_error_line(capsys, "train")
    assert "zz.broken.jpg: the image does not decode" in line and "Caught" not in line


class _Buggy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise KeyError("a bug in the code, not bad data")


def test_a_bug_in_a_worker_keeps_torchs_traceback():
    from normsam.train.data import Normalize

    loader = StreamedLoader(_Buggy(), normalize=Normalize((0.5,), (0.5,)), workers=1, device=torch.device("cpu"),
                            batches=lambda epoch: [[0, 1], [2, 3]])
    error = _first_error(loader)
    assert isinstance(error, KeyError) and "Caught KeyError in DataLoader worker process 0" in str(error)


# --- 1c. make-shards: all or nothing ----------------------------------------------------------------------------


def test_the_rerun_that_make_shards_suggests_works(image_folder, tmp_path, capsys):
    """Used to leave train-00000*.tar behind, so the suggested --skip-corrupt rerun said "already holds shards"."""
    root = _with_bad_files(image_folder, tmp_path / "imgs", zz_broken_jpg=b"not an image")
    out = tmp_path / "shards"
    assert cli.main(["make-shards", str(root), str(out), "--shard-size", "4"]) == 2
    line = _one_error_line(capsys, "make-shards")
    assert "zz.broken.jpg does not decode" in line and "--skip-corrupt" in line
    assert not out.exists()  # it was new: it is gone again
    assert cli.main(["make-shards", str(root), str(out), "--shard-size", "4", "--skip-corrupt"]) == 0
    assert "1 undecodable files skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir())[:2] == ["manifest.json", "train-000000.tar"]
    assert not (out / STAGING).exists()
    data = load_streamed_data(_cfg(data="webdataset", data_dir=str(out)))
    assert (len(data.train), len(data.test)) == (31, 9)


def test_make_shards_leaves_an_existing_folder_as_it_was(image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README").write_text("mine")
    bad = tmp_path / "mismatch"  # the val split's classes differ: found after every train shard was written
    shutil.copytree(image_folder, bad)
    (bad / "val" / "class2").rename(bad / "val" / "class9")
    with pytest.raises(ValueError, match="same class sub-folders"):
        make_shards(bad, out, shard_size=4, progress=False)
    assert [p.name for p in out.iterdir()] == ["README"]
    (out / STAGING).mkdir()  # what a killed make-shards leaves: cleared, not in the way
    (out / STAGING / "train-000000.tar").write_bytes(b"partial")
    manifest = make_shards(image_folder, out, shard_size=8, progress=False)
    assert manifest["splits"]["train"]["count"] == 31 and not (out / STAGING).exists()
    assert sorted(p.name for p in out.iterdir()) == ["README", "manifest.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar", "train-000003.tar", "val-000000.tar",
                                                     "val-000001.tar"]
    with tarfile.open(out / "train-000003.tar") as tar:
        assert len([m for m in tar.getmembers() if m.name.endswith(".cls")]) == 7


# --- 2. plans without the data ----------------------------------------------------------------------------------


def write_fake_cifar100(root: Path, per_split: int = 4) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(per_split, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 100 for i in range(per_split)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


def _write(name: str, root: Path) -> None:
    if name in ("fashion-mnist", "mnist"):
        write_fashion_mnist(root)
    elif name == "cifar10":
        write_fake_cifar10(root)
    else:
        write_fake_cifar100(root)


def _model_and_memory(plan) -> list[str]:
    return [line for line in plan["lines"] if line.lstrip().startswith(("model", "memory/rank"))]


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100"])
def test_a_plan_without_the_data_is_the_plan_with_it(name, tmp_path, monkeypatch):
    """Used to plan 1,000 classes of 3×224×224 images (9.2 GiB for resnet20 instead of 0.2)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fake pickles
    cfg = _cfg(data=name, model="resnet20", batch_size=128, image_size=None, data_dir=str(tmp_path / "data"))
    without = plan_run(cfg, world_size=1)
    _write(name, tmp_path / "data")
    with_data = plan_run(cfg, world_size=1)
    assert without["memory_bytes"] == with_data["memory_bytes"] < 2**30
    assert _model_and_memory(without) == _model_and_memory(with_data)
    shape = KNOWN_SHAPES[name]
    assert not without["data_found"] and with_data["data_found"]
    for plan in (without, with_data):
        assert (plan["num_classes"], plan["in_channels"], plan["image_size"]) == tuple(shape)
    text = without.text()
    assert f"planned for {shape.num_classes} classes of {shape.in_channels}×{shape.image_size}×" in text


def test_the_paper_cifar100_preset_plans_cifar100_before_the_data_is_there(tmp_path, monkeypatch, capsys):
    """108.76 GiB per GPU (ImageNet's shape) before; the real figure is under 3 GiB."""
    import torchvision.datasets.cifar as tv_cifar

    assert cli.main(["train", "--config", "paper-cifar100-wrn", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "100 classes of 3×32×32 images: cifar100's fixed shape" in text and "1000 classes" not in text
    plan = plan_run(load_config("paper-cifar100-wrn", {}), world_size=1)
    assert 2.5 * 2**30 < plan["memory_bytes"] < 3 * 2**30
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    write_fake_cifar100(tmp_path)
    present = plan_run(load_config("paper-cifar100-wrn", {"data_dir": str(tmp_path)}), world_size=1)
    assert present["memory_bytes"] == plan["memory_bytes"]


def test_the_not_found_part_of_a_plan_lists_where_it_looked(tmp_path):
    """The "Looked for ... in:" line used to end the data line, without the places it names."""
    cfg = _cfg(data="fashion-mnist", image_size=None, data_dir=str(tmp_path / "nowhere"))
    text = plan_run(cfg, world_size=1).text()
    looked = text.index("Looked for train-images-idx3-ubyte")
    places = text[looked:].splitlines()[1:4]
    assert all(str(tmp_path / "nowhere") in p and p.strip().startswith("- ") for p in places), text
    assert "To get the data" in text and "apt-get install dataset-fashion-mnist" in text


@pytest.mark.parametrize("overrides,planned", [
    (dict(data="imagefolder"), "1,000 classes of 3×64×64 images"),
    (dict(data="imagefolder", loader="stream"), "1,000 classes of 3×224×224 images"),
    (dict(data="imagefolder", image_size=96), "1,000 classes of 3×96×96 images"),
])
def test_data_sets_whose_classes_are_unknown_say_what_is_assumed(overrides, planned, tmp_path):
    cfg = _cfg(**{**overrides, "data_dir": str(tmp_path / "missing"), "image_size": overrides.get("image_size")})
    text = plan_run(cfg, world_size=1).text()
    assert planned in text and "known only from its files" in text and "assumed" in text


def test_a_missing_shard_folder_is_not_found_not_a_pattern(tmp_path, capsys):
    """data_dir=/no/such/folder used to be taken for a shard pattern ("give the validation shards too")."""
    with pytest.raises(DatasetNotFoundError, match=r"missing does not exist"):
        load_streamed_data(_cfg(data="webdataset", data_dir=str(tmp_path / "missing")))
    assert cli.main(["train", "--config", "paper-imagenet-resnet50", f"data_dir={tmp_path / 'missing'}",
                     "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "NOT FOUND" in text and "1,000 classes of 3×224×224 images" in text


def test_files_that_are_not_the_named_data_set_are_refused(tmp_path):
    """The plan trusts KNOWN_SHAPES, so the loader holds the files to it: 32×32 IDX images are not Fashion-MNIST."""
    folder = tmp_path / "fm"
    write_fashion_mnist(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((40, 32, 32), dtype=np.uint8))
    with pytest.raises(CorruptDataError, match=r"does not hold fashion-mnist: 10 classes of \(1, 32, 32\) images.*"
                                               r"fashion-mnist has 10 classes of \(1, 28, 28\)"):
        load_data("fashion-mnist", data_dir=folder)
