"""Loader throughput: webdataset shards vs a streamed image folder vs the in-memory path, images/s.

    python benchmarks/loader_throughput.py --images 512 --workers 2

Writes a JPEG image folder of ``--images`` random smooth images (``--source-size``, 3 classes) into a temporary
folder, makes shards of it with ``normsam make-shards``, and times one training epoch of each loader in
interleaved rounds (the median is printed), each yielding normalized float batches on the CPU:

* ``webdataset``: ``data=webdataset``, RandomResizedCrop(``--image-size``) + flip, decoded in ``--workers`` workers;
* ``imagefolder-stream``: ``data=imagefolder loader=stream``, the same transforms, ``--workers`` workers;
* ``in-memory``: ``data=imagefolder`` (the default, in-memory loader), every image decoded once up front at
  ``--image-size``, then random crop (pad 4) + flip per batch in the main process; the up-front decoding is
  timed separately. It cannot do a fresh RandomResizedCrop per epoch, so it is the faster but not the same job.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from normsam.train.config import load_config
from normsam.train.data import BatchLoader, make_augment
from normsam.train.data.make_shards import make_shards
from normsam.train.data.streamed import load_streamed_data, make_streamed_loaders
from normsam.train.run_folder import load_run_data


def write_folder(root: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for split, count in (("train", n), ("val", 30)):
        for i in range(count):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.random((h // 16, w // 16, 3)) * 255
            image = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR)
            noise = rng.normal(0, 12, (h, w, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def epoch_rate(loader) -> float:
    loader.set_epoch(1)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source-size", default="320x240", help="WxH of the JPEG files")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_folder(root, args.images, size)  # type: ignore[arg-type]
        make_shards(root, shards, shard_size=128, progress=False)
        common = dict(image_size=args.image_size, loader_workers=args.workers, batch_size=args.batch_size, threads=1)
        loaders = {}
        for name, data in (("webdataset", dict(data="webdataset", data_dir=str(shards))),
                           ("imagefolder-stream", dict(data="imagefolder", loader="stream", data_dir=str(root)))):
            cfg = load_config(None, {**common, **data})
            loaders[name] = make_streamed_loaders(cfg, load_streamed_data(cfg), rank=0, world_size=1,
                                                  batch_size=args.batch_size, device=torch.device("cpu"))[0]
        cfg = load_config(None, dict(data="imagefolder", data_dir=str(root), image_size=args.image_size,
                                     batch_size=args.batch_size))
        start = time.perf_counter()
        splits = load_run_data(cfg)
        decode_s = time.perf_counter() - start
        loaders["in-memory"] = BatchLoader(splits.train, args.batch_size, shuffle=True,
                                           augment=make_augment("crop-flip", splits), seed=0)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader))
    print(f"{args.images} JPEGs of {args.source_size} -> {args.image_size}px, batch {args.batch_size}, "
          f"{args.workers} workers, torch {torch.__version__}, {args.rounds} interleaved rounds (median):")
    for name, values in rates.items():
        print(f"  {name:<20} {statistics.median(values):8.0f} images/s  (rounds: "
              f"{', '.join(f'{v:.0f}' for v in values)})")
    print(f"  in-memory up-front decoding: {args.images / decode_s:.0f} images/s ({decode_s:.1f} s, main process)")


if __name__ == "__main__":
    main()
