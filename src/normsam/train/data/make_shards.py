"""``normsam make-shards IMAGEFOLDER OUT``: webdataset shards from an ImageNet-style folder.

``IMAGEFOLDER/train/<class>/<image>`` and ``IMAGEFOLDER/val/<class>/<image>`` (or ``test/``) become
``OUT/train-000000.tar, ...`` and ``OUT/val-000000.tar, ...``, each holding ``shard_size`` samples (the last
one fewer), written with :class:`webdataset.ShardWriter`. A sample is ``KEY.<ext>`` (the image file's bytes,
unchanged: no re-encoding) plus ``KEY.cls`` (the class index in decimal); keys are running numbers.

The training images are written in an order shuffled from ``seed`` so that every shard mixes all classes
(the reader shuffles shards and a buffer within them, which cannot mix a class-sorted stream); the
validation images keep the folder's order.

Every image is decoded once while it is written, so that a shard never holds an undecodable image: a file
that does not decode is an error naming it, or with ``skip_corrupt=True`` it is left out and listed in the
manifest. ``OUT/manifest.json`` is written last (atomically): the class names, per split the shard files with
their sample counts, the counts per class, and the skipped files. ``data=webdataset data_dir=OUT`` reads it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from normsam.train.data.containers import CorruptDataError, DatasetNotFoundError
from normsam.train.data.splits import data_generator
from normsam.train.data.streamed import MANIFEST

__all__ = ["make_shards"]

#: The folder inside OUT that the shards are written to before they are moved into OUT.
STAGING = ".make-shards.partial"


def _listing(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    import torchvision.datasets as tvd

    try:
        listing = tvd.ImageFolder(str(folder), loader=lambda p: p)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{folder} has no usable class folders or images ({exc}).") from exc
    return list(listing.classes), list(listing.samples)


def _check_image(path: str) -> str | None:
    """None when the file decodes, else the reason."""
    from normsam.train.data.readers import UndecodableImageError, read_image_file

    try:
        read_image_file(path)
    except UndecodableImageError as exc:
        return str(exc)
    return None


def make_shards(
    image_folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    skip_corrupt: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the shards and ``manifest.json``; returns the manifest. ``workers`` processes decode the images
    to check them (in order, so the shards are the same for any number); the main process writes.

    All or nothing: the shards are written into ``OUT/.make-shards.partial`` and moved into ``OUT`` only once
    every split is written; after an error (or Ctrl-C) ``OUT`` is left as it was, so the command that the error
    suggests (e.g. with ``--skip-corrupt``) runs into the same ``OUT``."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size must be an int >= 1 (samples per shard), got {shard_size!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an int >= 1 (processes that decode the images), got {workers!r}.")
    root, out = Path(image_folder).expanduser(), Path(out).expanduser()
    splits = [("train", root / "train")]
    eval_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or eval_dir is None:
        raise DatasetNotFoundError(f"make-shards expects {root / 'train'}/<class>/<image> and {root / 'val'}/<class>/"
                                   f"<image> (or test/); found train/: {(root / 'train').is_dir()}, val/ or test/: "
                                   f"{eval_dir is not None}.")
    splits.append((eval_dir.name, eval_dir))
    if out.exists() and any(out.glob("*.tar")) or (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds shards; choose an empty or new folder for OUT.")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    if staging.exists():  # left by a make-shards that was killed: only ever written by make-shards
        shutil.rmtree(staging)
    staging.mkdir()
    placed: list[Path] = []
    try:
        manifest = _write_splits(splits, root, staging, shard_size=shard_size, seed=seed, skip_corrupt=skip_corrupt,
                                 progress=progress, workers=workers)
        for entry in manifest["splits"].values():
            for shard in entry["shards"]:
                os.replace(staging / shard["name"], out / shard["name"])
                placed.append(out / shard["name"])
        tmp = staging / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out / MANIFEST)  # last: a folder with a manifest is complete
    except BaseException:  # an error, or Ctrl-C: leave OUT as it was, so that the same command can run again
        for path in placed:
            path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging)
    return manifest


def _write_splits(splits: list[tuple[str, Path]], root: Path, staging: Path, *, shard_size: int, seed: int,
                  skip_corrupt: bool, progress: bool, workers: int) -> dict[str, Any]:
    """Write every split's shards into ``staging``; returns the manifest."""
    import webdataset as wds
    from tqdm.auto import tqdm

    classes: list[str] | None = None
    manifest: dict[str, Any] = {"format": "normsam-shards/1", "source": str(root), "shard_size": shard_size,
                                "seed": seed, "classes": [], "splits": {}}
    for split, folder in splits:
        names, samples = _listing(folder)
        if classes is not None and names != classes:
            raise ValueError(f"the class folders of {folder} ({names}) differ from those of {root / 'train'} "
                             f"({classes}); both splits need the same class sub-folders so that labels agree.")
        classes = names
        if split == "train":
            order = torch.randperm(len(samples), generator=data_generator(seed, 9)).tolist()
            samples = [samples[i] for i in order]
        shards: list[dict[str, Any]] = []
        per_class: Counter[str] = Counter()
        skipped: list[dict[str, str]] = []

        def finished(fname: str) -> None:
            shards.append({"name": os.path.basename(fname), "count": writer.count})

        pattern = str(staging / f"{split}-%06d.tar")
        writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), post=finished, verbose=0)
        written = 0
        pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            checks = pool.imap(_check_image, [p for p, _ in samples], chunksize=32) if pool else map(
                _check_image, (p for p, _ in samples))
            for (path, label), problem in tqdm(zip(samples, checks), total=len(samples), desc=f"make-shards {split}",
                                               disable=None if progress else True, unit="img"):
                if problem is not None:
                    if not skip_corrupt:
                        raise CorruptDataError(f"{path} does not decode ({problem}); remove or replace it, or pass "
                                               "--skip-corrupt to leave such files out (they are listed in the manifest).")
                    skipped.append({"path": path, "reason": problem})
                    continue
                ext = Path(path).suffix.lower().lstrip(".") or "jpg"
                writer.write({"__key__": f"{written:09d}", ext: Path(path).read_bytes(), "cls": str(label).encode()})
                per_class[names[label]] += 1
                written += 1
        finally:
            writer.close()
            if pool is not None:
                pool.terminate()
        shards = [s for s in shards if s["count"] > 0]
        if written == 0:
            raise CorruptDataError(f"{folder}: no image could be written (all {len(skipped)} failed to decode).")
        last = len(shards) - 1
        manifest["splits"][split] = {
            "pattern": f"{split}-{{000000..{last:06d}}}.tar",
            "count": written,
            "per_class": {name: per_class.get(name, 0) for name in names},
            "shards": shards,
            "skipped": skipped,
        }
    manifest["classes"] = classes
    return manifest
