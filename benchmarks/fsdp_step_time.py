"""FSDP2 step time and extra memory per rank: SGD-style base step vs SAM-ON and SAM-all, interleaved.

Usage (2 processes on the CPU; gloo):
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_step_time.py [--rounds 12] [--smoke]

The model is examples/fsdp_sam_on.py's Llama-style transformer (RMSNorm), every block ``fully_shard``-ed, then
the root; base optimizer AdamW. Variants, each on its own copy of the same initial weights, timed in
interleaved rounds (round r runs every variant for a few steps, so drifts of a shared machine hit them alike):

- ``AdamW``: the plain FSDP2 step (one forward-backward), the 1.0 of every ratio;
- ``normsam SAM-ON``: ``first_step(loss)``, the cheap ascent (only the RMSNorm weights' gradients are
  computed and reduce-scattered in the first pass);
- ``normsam SAM-ON, full first backward``: the classic API (``loss.backward(); first_step()``), every
  gradient in the first pass: what the cheap ascent saves;
- ``normsam SAM-all``: every tensor perturbed;
- ``hand-written SAM-all``: the shortest correct FSDP2 SAM a user would write (global norm by one
  all-reduce of the local squares, ε and the copy on local shards, ``torch._foreach_*``): the floor;
- ``pytorch_optimizer.SAM``: the peer, as its documentation uses it (reported as failing when it cannot run
  on DTensor shards).

Each variant's step time is the median over rounds of the slowest rank's mean step; extra memory per rank is
what the variant keeps besides parameters, gradients and the base optimizer's state: SAM's saved copy (and
for pytorch_optimizer its per-parameter ``old_p``), counted from the tensors themselves on rank 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import normsam
from normsam.train.setup import close_process_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fsdp_sam_on import TinyLlama, batch, shard  # noqa: E402

VOCAB = 64


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def make_variants(base: TinyLlama, mesh, rho_on: float, rho_all: float, lr: float):
    """name → (step(inputs, targets), extra bytes on this rank after a step), and the parameters' bytes per rank."""

    def fresh():
        return shard(copy.deepcopy(base), mesh)

    def loss_of(model, inputs, targets):
        return F.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))

    variants = {}

    model = fresh()
    adamw = torch.optim.AdamW(model.parameters(), lr=lr)

    def plain(inputs, targets, model=model, opt=adamw):
        loss_of(model, inputs, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants["AdamW (no SAM)"] = (plain, lambda: 0)
    params_bytes = local_bytes(model.parameters())

    def normsam_variant(scope, rho, cheap):
        model = fresh()
        sam = normsam.SAM(model, torch.optim.AdamW, scope=scope, rho=rho, lr=lr)

        def step(inputs, targets):
            loss = loss_of(model, inputs, targets)
            if cheap:
                sam.first_step(loss, zero_grad=True)
            else:
                loss.backward()
                sam.first_step(zero_grad=True)
            loss_of(model, inputs, targets).backward()
            sam.second_step(zero_grad=True)

        return step, lambda: local_bytes(sam.perturbed_parameters())  # the saved copy: their local shards

    variants["normsam SAM-ON"] = normsam_variant("norm", rho_on, True)
    variants["normsam SAM-ON, full first backward"] = normsam_variant("norm", rho_on, False)
    variants["normsam SAM-all"] = normsam_variant("all", rho_all, True)

    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    params = list(model.parameters())
    saved = [p.to_local().clone() for p in params]

    def handwritten(inputs, targets, model=model, opt=opt, params=params, saved=saved):
        loss_of(model, inputs, targets).backward()
        with torch.no_grad():
            local_w = [p.to_local() for p in params]
            local_g = [p.grad.to_local() for p in params]
            squares = torch.stack(torch._foreach_norm(local_g)).square().sum()
            dist.all_reduce(squares)
            eps = torch._foreach_mul(local_g, rho_all / (squares.sqrt() + 1e-12))
            torch._foreach_copy_(saved, local_w)
            torch._foreach_add_(local_w, eps)
        opt.zero_grad(set_to_none=True)
        loss_of(model, inputs, targets).backward()
        with torch.no_grad():
            torch._foreach_copy_([p.to_local() for p in params], saved)
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants["hand-written SAM-all"] = (handwritten, lambda: sum(s.numel() * s.element_size() for s in saved))

    try:
        from pytorch_optimizer import SAM as PeerSAM
    except ImportError:
        PeerSAM = None
    if PeerSAM is not None:
        model = fresh()
        peer = PeerSAM(model.parameters(), torch.optim.AdamW, rho=rho_all, lr=lr)

        def peer_step(inputs, targets, model=model, peer=peer):
            loss_of(model, inputs, targets).backward()
            peer.first_step(zero_grad=True)
            loss_of(model, inputs, targets).backward()
            peer.second_step(zero_grad=True)

        def peer_bytes(peer=peer):
            return local_bytes(s["old_p"] for s in peer.state.values() if "old_p" in s)

        variants["pytorch_optimizer.SAM (SAM-all)"] = (peer_step, peer_bytes)
    return variants, params_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny: checks the script, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.dim, args.layers, args.batch, args.length = 2, 1, 32, 2, 4, 16
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = TinyLlama(VOCAB, args.dim, args.layers, max_len=args.length)
    variants, params_bytes = make_variants(base, mesh, rho_on=0.5, rho_all=0.05, lr=1e-3)
    times: dict[str, list[float]] = {name: [] for name in variants}
    failed: dict[str, str] = {}
    tokens = batch(0, args.batch, args.length, VOCAB, rank, world)
    for name, (step, _) in list(variants.items()):  # warm-up (plans, buffers, optimizer state), and who runs
        try:
            step(tokens[:, :-1], tokens[:, 1:])
        except Exception as error:  # noqa: BLE001 - a yardstick that cannot run on shards is reported, not hidden
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            del variants[name], times[name]
    step_index = 1
    for r in range(1, args.rounds + 1):
        for name, (step, _) in variants.items():
            tokens = batch(step_index, args.batch, args.length, VOCAB, rank, world)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(tokens[:, :-1], tokens[:, 1:])
            elapsed = torch.tensor((time.perf_counter() - start) / args.steps, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
            times[name].append(float(elapsed))
        step_index += 1
    if rank == 0:
        base_ms = statistics.median(times["AdamW (no SAM)"]) * 1e3
        print(f"world size {world}, TinyLlama dim {args.dim} x {args.layers} layers, global batch {args.batch} x "
              f"{args.length} tokens, torch {torch.__version__}, {args.rounds} interleaved rounds x {args.steps} steps")
        print(f"parameters per rank: {params_bytes / 2**10:.1f} KiB")
        print("| variant | step (ms, median) | / AdamW | extra memory per rank |")
        print("|---|---:|---:|---:|")
        for name, (_, extra) in variants.items():
            ms = statistics.median(times[name]) * 1e3
            print(f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {extra() / 2**10:.2f} KiB |")
        for name, why in failed.items():
            print(f"| {name} | fails on FSDP2 shards: {why} | | |")


if __name__ == "__main__":
    main()
    # not destroy_process_group() alone: the sharded models' meshes still hold the group, and a gloo worker
    # that frees a collective's tensors once the interpreter is finalizing aborts the process
    close_process_group()
