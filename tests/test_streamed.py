"""Streamed data: make-shards, data=webdataset and imagefolder loader=stream, ranks and workers, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normsam import cli
from normsam.train import checkpoint as ckpt
from normsam.train.config import load_config
from normsam.train.data import CorruptDataError, DatasetNotFoundError, Normalize
from normsam.train.data.make_shards import make_shards
from normsam.train.data.streamed import (
    Shard,
    ShardStream,
    expand_shards,
    folder_batches,
    load_streamed_data,
    make_streamed_loaders,
    scan_shard,
)
from normsam.train.loop import Trainer, resume
from normsam.train.plan import plan_run

CLASSES = 3
N_TRAIN, N_VAL = 31, 9  # odd: the epoch's last sample cannot be shared by 2 ranks
TINY = dict(image_size=16, model="resnet8", epochs=2, batch_size=4, eval_batch_size=8, threads=1, progress=False,
            device="cpu", norm_stats=False)


def write_image_folder(root: Path, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """JPEG and PNG images of odd sizes (some grayscale), class-dependent brightness, unique noise each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % CLASSES
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = 19 + (i * 7) % 23, 17 + (i * 5) % 29
            pixels = (rng.random((h, w, 3)) * 60 + 70 * c).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i % 5 == 1:
                image = image.convert("L")
            image.save(folder / (f"img{i}.png" if i % 4 == 0 else f"img{i}.jpg"))
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    make_shards(image_folder, out, shard_size=7, progress=False)
    return out


def _cfg(**kw):
    return load_config(None, {**TINY, **kw})


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


def _epoch_digests(loader) -> list[str]:
    return [_digest(img) for x, _ in loader for img in x]


# --- make-shards ------------------------------------------------------------------------------------------


def test_make_shards_writes_every_image_once_with_a_manifest(image_folder, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["classes"] == ["class0", "class1", "class2"]
    train = manifest["splits"]["train"]
    assert train["count"] == N_TRAIN and train["per_class"] == {"class0": 11, "class1": 10, "class2": 10}
    assert [s["count"] for s in train["shards"]] == [7, 7, 7, 7, 3]
    assert [scan_shard(str(shards / s["name"]))[0] for s in train["shards"]] == [7, 7, 7, 7, 3]
    assert expand_shards(str(shards / train["pattern"])) == [str(shards / s["name"]) for s in train["shards"]]
    # the bytes are the original files', unchanged; every shard mixes the classes (the training order is shuffled)
    originals = {p.read_bytes() for p in (image_folder / "train").rglob("*.*")}
    members, labels_of_first = set(), set()
    for i, s in enumerate(train["shards"]):
        with tarfile.open(shards / s["name"]) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".cls"):
                    labels_of_first |= {int(data)} if i == 0 else set()
                else:
                    members.add(data)
    assert members == originals and labels_of_first == {0, 1, 2}
    assert manifest["splits"]["val"]["count"] == N_VAL


@pytest.mark.slow  # two spawned processes that import torch: 3-6 s
def test_make_shards_with_several_workers_writes_the_same_shards(image_folder, shards, tmp_path):
    parallel = make_shards(image_folder, tmp_path / "p", shard_size=7, progress=False, workers=2)
    serial = json.loads((shards / "manifest.json").read_text())
    assert {k: v for k, v in parallel.items() if k != "source"} == {k: v for k, v in serial.items() if k != "source"}
    for s in serial["splits"]["train"]["shards"]:
        with tarfile.open(shards / s["name"]) as a, tarfile.open(tmp_path / "p" / s["name"]) as b:
            assert [(m.name, a.extractfile(m).read()) for m in a] == [(m.name, b.extractfile(m).read()) for m in b]


def test_make_shards_refuses_a_used_folder_and_undecodable_images(image_folder, shards, tmp_path, capsys):
    assert cli.main(["make-shards", str(image_folder), str(shards)]) == 2
    assert "already holds shards" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(image_folder, bad)
    (bad / "train" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CorruptDataError, match=r"broken\.jpg does not decode.*--skip-corrupt"):
        make_shards(bad, tmp_path / "out1", shard_size=10, progress=False)
    assert cli.main(["make-shards", str(bad), str(tmp_path / "out2"), "--shard-size", "10", "--skip-corrupt"]) == 0
    assert "1 undecodable files skipped" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == N_TRAIN
    assert [Path(s["path"]).name for s in manifest["splits"]["train"]["skipped"]] == ["broken.jpg"]


# --- every example once per epoch ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 1)])
def test_shard_streams_cover_each_example_once_per_epoch(shards, world_size, workers):
    """The ranks' streams of an epoch (eval transform, so that an image identifies its example) hold every
    example at most once, and all but the N mod world_size left out; every rank runs the same steps."""
    cfg = _cfg(data="webdataset", data_dir=str(shards), augment="none", loader_workers=workers, shuffle_buffer=5)
    data = load_streamed_data(cfg)
    from normsam.train.data.streamed import sample_transform

    every = ShardStream(data.train.shards, batch_size=4, transform=sample_transform("none", 16, train=False),
                        num_classes=CLASSES, seed=0, shuffle=False)
    normalize = Normalize(data.mean, data.std)  # the loader normalizes on the device
    reference = {_digest(img) for x, _ in every for img in normalize(x)}
    assert len(reference) == N_TRAIN
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world_size):
            loader = make_streamed_loaders(cfg, data, rank=rank, world_size=world_size, batch_size=4,
                                           device=torch.device("cpu"))[0]
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            lengths.add(len(batches))
            seen += [_digest(img) for x, _ in batches for img in x]
        assert len(lengths) == 1
        assert len(seen) == len(set(seen)) == N_TRAIN - N_TRAIN % world_size
        assert set(seen) <= reference


def test_the_epoch_order_is_a_function_of_seed_and_epoch(shards):
    def order(seed, epoch, workers):
        cfg = _cfg(data="webdataset", data_dir=str(shards), augment="none", loader_workers=workers, seed=seed)
        loader = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=0, world_size=1, batch_size=4,
                                       device=torch.device("cpu"))[0]
        loader.set_epoch(epoch)
        return _epoch_digests(loader)

    first = order(0, 0, 2)
    assert order(0, 0, 2) == first
    assert order(0, 1, 2) != first and order(1, 0, 2) != first
    assert sorted(order(0, 0, 0)) == sorted(first)  # other workers: the same examples


def test_random_augmentation_is_per_sample_and_reproducible(image_folder):
    cfg = _cfg(data="imagefolder", loader="stream", data_dir=str(image_folder), loader_workers=0)
    data = load_streamed_data(cfg)
    runs = []
    for workers in (0, 2):
        cfg.loader_workers = workers
        loader = make_streamed_loaders(cfg, data, rank=0, world_size=1, batch_size=4, device=torch.device("cpu"))[0]
        loader.set_epoch(3)
        runs.append([x for x, _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[0], runs[0][0])
    assert runs[0][0].shape == (4, 3, 16, 16) and runs[0][0].dtype == torch.float32


def test_image_folder_ranks_split_the_single_process_global_batch():
    single = folder_batches(31, 8, seed=0, epoch=2, shuffle=True)
    ranks = [folder_batches(31, 4, seed=0, epoch=2, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]
    for step, batch in enumerate(single[:3]):  # full global batches: rank 0 takes the first half, rank 1 the rest
        assert ranks[0][step] + ranks[1][step] == batch
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == 30


def test_ddp_ranks_see_each_example_once_and_train_the_imagenet_preset(shards, tmp_path):
    """Two processes under torchrun (gloo), each its rank's share: every example once per epoch; then the
    ResNet-50 preset (at 32 px) trains on the shards in the same two processes."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import hashlib, json, os, sys, torch\n"
        "import torch.distributed as dist\n"
        "from normsam.train.config import load_config\n"
        "from normsam.train.data.streamed import load_streamed_data, make_streamed_loaders\n"
        "dist.init_process_group('gloo')\n"
        "r, w = dist.get_rank(), dist.get_world_size()\n"
        f"cfg = load_config(None, dict(data='webdataset', data_dir={str(shards)!r}, augment='none', image_size=16, "
        "loader_workers=2, shuffle_buffer=4))\n"
        "loader = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=r, world_size=w, batch_size=3, "
        "device=torch.device('cpu'))[0]\n"
        "out = {}\n"
        "for epoch in (0, 1):\n"
        "    loader.set_epoch(epoch)\n"
        "    out[epoch] = [hashlib.sha1(i.numpy().tobytes()).hexdigest() for x, _ in loader for i in x]\n"
        "json.dump(out, open(sys.argv[1] + f'/rank{r}.json', 'w'))\n"
        "from normsam.train.loop import Trainer\n"
        f"Trainer(load_config('paper-imagenet-resnet50', dict(data_dir={str(shards)!r}, image_size=32, epochs=1, "
        "batch_size=8, eval_batch_size=8, loader_workers=1, amp='off', device='cpu', threads=1, progress=False, "
        "norm_stats=False, out=sys.argv[1] + '/run'))).run()\n"
        "dist.destroy_process_group()\n"
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        seen = ranks[0][epoch] + ranks[1][epoch]
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == N_TRAIN // 2
        assert len(set(seen)) == len(seen) == N_TRAIN - 1
    rows = ckpt.read_jsonl(tmp_path / "run" / "metrics.jsonl")  # the ResNet-50 preset trained on the shards
    assert len(rows) == 1 and rows[0]["sam"] and "test_acc" in rows[0]
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["world_size"] == 2


# --- training ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["webdataset", "imagefolder"])
def test_streamed_training_resumes_exactly_at_an_epoch_boundary(source, shards, image_folder, tmp_path):
    data = dict(data="webdataset", data_dir=str(shards)) if source == "webdataset" else \
        dict(data="imagefolder", loader="stream", data_dir=str(image_folder))
    Trainer(_cfg(**data, loader_workers=2, out=str(tmp_path / "straight"))).run()
    cut = tmp_path / "cut"  # as if the run had stopped after epoch 1: its checkpoint of epoch 1, no summary
    shutil.copytree(tmp_path / "straight", cut)
    os.replace(cut / "checkpoint.prev.pt", cut / "checkpoint.pt")
    (cut / "summary.json").unlink()
    resume(cut)
    a, b = (ckpt.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("straight", "cut"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("train_loss", "train_loss_perturbed", "test_loss", "test_acc"):
            assert x[key] == y[key], key
    assert a[0]["images_per_s"] > 0


def test_sharpness_of_a_streamed_run(shards, image_folder, tmp_path):
    from normsam.train.run_sharpness import measure_run_sharpness
    from normsam.train.data.streamed import sharpness_examples

    summary = Trainer(_cfg(data="webdataset", data_dir=str(shards), epochs=1, loader_workers=0, sharpness_at_end=True,
                           sharpness_steps=2, out=str(tmp_path / "run"))).run()
    assert summary["sharpness"] >= 0
    again = measure_run_sharpness(tmp_path / "run", rho=0.01, steps=2, m=8, n=20)
    assert again["examples"] == 20 and again["sharpness"] >= 0
    for source in (dict(data="webdataset", data_dir=str(shards)),
                   dict(data="imagefolder", loader="stream", data_dir=str(image_folder))):
        data = load_streamed_data(_cfg(**source))
        x, y = sharpness_examples(data, n=12, seed=3)
        x2, y2 = sharpness_examples(data, n=12, seed=3)
        assert x.shape == (12, 3, 16, 16) and torch.equal(x, x2) and torch.equal(y, y2)


def test_streamed_folders_take_subset_val_split_label_noise_and_eval_subset_as_in_memory(image_folder, tmp_path):
    from normsam.train.data import load_data

    options = dict(subset=24, val_split=0.25, label_noise=0.5, seed=4)
    memory = load_data("imagefolder", data_dir=str(image_folder), image_size=16, **options)
    data = load_streamed_data(_cfg(data="imagefolder", loader="stream", data_dir=str(image_folder), **options))
    assert torch.equal(data.train.labels, memory.train.labels) and torch.equal(data.val.labels, memory.val.labels)
    assert torch.equal(data.noisy_indices, memory.noisy_indices)
    assert (len(data.train), len(data.val)) == (18, 6)
    scored = load_streamed_data(_cfg(data="imagefolder", loader="stream", data_dir=str(image_folder), eval_subset=6))
    assert len(scored.test) == 6 and scored.test.labels.bincount().tolist() == [2, 2, 2]
    summary = Trainer(_cfg(data="imagefolder", loader="stream", data_dir=str(image_folder), epochs=1, eval_subset=6,
                           loader_workers=0, out=str(tmp_path / "run"), **options)).run()
    row = ckpt.read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert "val_acc" in row and summary["final_val_acc"] is not None
    noise = json.loads((tmp_path / "run" / "label_noise.json").read_text())
    assert noise["num_flipped"] == 9 and noise["num_train"] == 18


def test_dry_run_prints_the_plan_without_training(shards, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["train", "--config", "paper-imagenet-resnet50", "--dry-run", "--world-size", "2",
                     f"data_dir={shards}", "batch_size=8", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "31 train / 9 evaluation images, 3 classes, 224px" in text
    assert "batch 8 = 4 per rank × 2" in text
    assert "4 per epoch × 90 epochs = 360" in text  # 15 examples per rank in batches of 4
    assert "asam ρ=5" in text and "memory/rank" in text and not out.exists()
    plan = plan_run(_cfg(data="webdataset", data_dir=str(shards), scope="all"), world_size=1)
    assert plan["steps_per_epoch"] == 8 and plan["memory_bytes"] > 0


# --- bad input -------------------------------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 11, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _stream(path: Path, count: int) -> ShardStream:
    from normsam.train.data.streamed import sample_transform

    return ShardStream([Shard(str(path), count)], batch_size=2, transform=sample_transform("none", 8, train=False),
                       num_classes=2, seed=0, shuffle=False)


def test_bad_shards_are_errors_that_name_the_shard_and_the_key(tmp_path):
    good = [(f"s{i}", {"jpg": _jpeg(10 * i), "cls": b"1"}) for i in range(4)]
    assert len(list(_stream(_write_shard(tmp_path / "ok.tar", good), 4))) == 2
    undecodable = _write_shard(tmp_path / "a.tar", [*good[:2], ("s9", {"jpg": b"garbage", "cls": b"0"})])
    with pytest.raises(CorruptDataError, match=r"shard .*a\.tar, sample 's9': the image does not decode"):
        list(_stream(undecodable, 3))
    no_label = _write_shard(tmp_path / "b.tar", [("s1", {"jpg": _jpeg(1)})])
    with pytest.raises(CorruptDataError, match=r"b\.tar, sample 's1' has members \['jpg'\].*\.cls"):
        list(_stream(no_label, 1))
    wrong_label = _write_shard(tmp_path / "c.tar", [("s1", {"jpg": _jpeg(1), "cls": b"7"})])
    with pytest.raises(CorruptDataError, match=r"c\.tar, sample 's1': class index 7 is outside 0\.\.1"):
        list(_stream(wrong_label, 1))
    raw = (tmp_path / "ok.tar").read_bytes()
    truncated = tmp_path / "d.tar"
    with tarfile.open(tmp_path / "ok.tar") as tar:  # cut inside the third sample's image
        cut = next(m for m in tar.getmembers() if m.name == "s2.jpg").offset_data + 50
    truncated.write_bytes(raw[:cut])
    with pytest.raises(CorruptDataError, match=r"shard .*d\.tar is damaged after sample 's0' \(ReadError: unexpected end of data\)"):
        list(_stream(truncated, 4))
    with pytest.raises(CorruptDataError, match=r"shard .*d\.tar is not a readable tar file"):
        scan_shard(str(truncated))
    garbled = tmp_path / "e.tar"
    garbled.write_bytes(raw[:1024] + b"\x00junk" * 200 + raw[2048:])
    with pytest.raises(CorruptDataError, match=r"shard .*e\.tar"):
        list(_stream(garbled, 4))


def test_shard_patterns_that_match_nothing_and_patterns_without_a_manifest(shards, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"2 of 2 shards do not exist"):
        expand_shards(str(tmp_path / "train-{0..1}.tar"))
    with pytest.raises(DatasetNotFoundError, match="matches no file"):
        expand_shards(str(tmp_path / "*.tar"))
    cfg = _cfg(data="webdataset", data_dir=str(shards / "train-{000000..000004}.tar"))
    with pytest.raises(ValueError, match="val_data_dir=PATTERN"):
        load_streamed_data(cfg)
    cfg = _cfg(data="webdataset", data_dir=str(shards / "train-*.tar"),
               val_data_dir=str(shards / "val-{000000..000001}.tar"))
    data = load_streamed_data(cfg)  # counted by scanning the shards
    assert (len(data.train), len(data.test), data.num_classes) == (N_TRAIN, N_VAL, CLASSES)


def test_an_undecodable_file_in_a_streamed_folder_names_the_file(image_folder, tmp_path):
    root = tmp_path / "folder"
    shutil.copytree(image_folder, root)
    (root / "train" / "class0" / "zz-broken.jpg").write_bytes(b"not an image")
    cfg = _cfg(data="imagefolder", loader="stream", data_dir=str(root), augment="none", loader_workers=0)
    loader = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=0, world_size=1, batch_size=64,
                                   device=torch.device("cpu"))[0]
    with pytest.raises(CorruptDataError, match=r"zz-broken\.jpg: the image does not decode"):
        list(loader)


@pytest.mark.parametrize("overrides,message", [
    (dict(data="webdataset", subset=10, label_noise=0.2), "subset, label_noise need every label before training"),
    (dict(data="imagefolder", loader="stream", scope="ssam-f", sparsity=0.5), "scope=ssam-f is not supported"),
    (dict(data="webdataset", augment="crop-flip"), "augment='crop-flip' is a preset of the in-memory path"),
    (dict(data="webdataset", loader="memory"), "always streamed; drop loader=memory"),
    (dict(data="synthetic", loader_workers=2), "loader_workers=2 only applies to streamed data"),
    (dict(data="cifar10", loader="stream"), "data=cifar10 is held in memory"),
    (dict(data="imagefolder", loader="stream", shuffle_buffer=10), "shuffle_buffer only applies to data=webdataset"),
    (dict(data="webdataset", loader="disk"), "Invalid loader: 'disk'"),
    (dict(data="webdataset"), "data=webdataset needs data_dir"),
    (dict(data="webdatset"), r"unknown data set 'webdatset'; valid names are: fashion-mnist, .*, webdataset"),
])
def test_streamed_options_are_checked(overrides, message, tmp_path):
    from normsam.train.run_folder import load_run_data

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_run_data(_cfg(**overrides))
