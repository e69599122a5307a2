"""Step costs behind the regime study's wall-clock estimate (docs/results/study-regime/README.md).

    python benchmarks/study_step_costs.py          # ResNet-20, batch 128 × 1×28×28, 1 thread, 5 rounds

1. fp32 against bf16 autocast on the native kernels and on the upcast ones (``bf16_kernels=upcast``,
   normsam.optim.amp): interleaved rounds of two SGD steps each (on a CPU without bf16 instructions, the
   native bf16 convolution is PyTorch's slow fallback), then the time of an evaluation forward pass of 512
   images;
2. SAM-all against the random mask at SAM-ON's sparsity (asam): interleaved single steps.
Prints per-round times and the median ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normsam.optim.amp import upcast_bf16_matmuls
from normsam.train.models import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=args.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(name: str) -> None:
        with upcast_bf16_matmuls("upcast" if name == "bf16-upcast" else "native"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()

    times: dict[str, list[float]] = {"fp32": [], "bf16": [], "bf16-upcast": []}
    for name in times:  # warm-up: the first bf16 steps pay for oneDNN's kernel set-up
        step(name)
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            step(name)
            step(name)
            times[name].append((time.perf_counter() - start) / 2)
    model.eval()
    with torch.no_grad():
        batch = torch.randn(512, 1, args.image_size, args.image_size)
        model(batch)
        start = time.perf_counter()
        model(batch)
        forward = time.perf_counter() - start
    for name, values in times.items():
        print(f"{name}: " + " ".join(f"{1000 * t:.0f}" for t in values) + " ms per step")
    for name in ("bf16", "bf16-upcast"):
        ratio = statistics.median(b / f for b, f in zip(times[name], times["fp32"]))
        print(f"{name} / fp32 (median per round): {ratio:.2f}x")
    print(f"evaluation forward: {1000 * forward:.0f} ms per 512 images")

    import normsam

    def sam_step(**options):
        net = build_model("resnet20", num_classes=10, in_channels=1, image_size=args.image_size)
        sam = normsam.SAM(net, torch.optim.SGD, rho=0.3, perturbation="asam", lr=0.1, momentum=0.9, **options)

        def step() -> None:
            sam.first_step(F.cross_entropy(net(x), y), zero_grad=True)
            F.cross_entropy(net(x), y).backward()
            sam.second_step(zero_grad=True)

        return step

    share = normsam.describe_scope(build_model("resnet20", num_classes=10, in_channels=1,
                                               image_size=args.image_size), "norm").share
    steps = {"SAM-all": sam_step(scope="all"), "random mask": sam_step(scope="random", sparsity=1 - share)}
    masks: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            masks[name].append(time.perf_counter() - start)
    for name, values in masks.items():
        print(f"{name}: " + " ".join(f"{1000 * t:.0f}" for t in values) + " ms per step")
    ratio = statistics.median(r / a for r, a in zip(masks["random mask"], masks["SAM-all"]))
    print(f"random mask (sparsity {1 - share:.6f}) / SAM-all (median per round): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
