"""SAM-ON on an FSDP2-sharded, Llama-style language model (RMSNorm, rotary-free causal attention, SwiGLU).

Every block is sharded with ``fully_shard``, then the root; ``normsam.SAM`` perturbs only the RMSNorm weights
(a few hundred numbers here, a few thousand in a 7B model), backs up only each rank's shard of them, and its
cheap ascent computes and reduce-scatters only their gradients. Run it on the CPU with 2 processes:

    torchrun --standalone --nproc_per_node=2 examples/fsdp_sam_on.py

(``--tiny`` for a run of seconds; ``--steps``, ``--dim``, ``--layers`` to size it; on GPUs the backend is
NCCL and each rank takes its own device). The task is synthetic: count in steps of 3 from a random start, so
the loss falls from log(64) ≈ 4.16 towards 0 as the model learns the rule.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import normsam


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def shard(model: TinyLlama, mesh) -> TinyLlama:
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root last: embedding, final norm and head
    return model


def batch(step: int, size: int, length: int, vocab: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the global batch of ``step``: counting in steps of 3 (mod vocab) from a random
    start, so the next token follows from the current one."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    tokens = (start + 3 * torch.arange(length)) % vocab
    return tokens.chunk(world)[rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.5, help="SAM-ON's radius (larger than SAM-all's)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (a smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.dim, args.batch, args.length = 4, 32, 4, 16

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    vocab = 64
    model = shard(TinyLlama(vocab, args.dim, args.layers, max_len=args.length).to(device),
                  init_device_mesh(device.type, (world,)))

    # SAM-ON: scope="norm" (the default) perturbs the RMSNorm weights only; AdamW is the base optimizer
    sam = normsam.SAM(model, torch.optim.AdamW, rho=args.rho, lr=args.lr, weight_decay=0.01)
    if rank == 0:
        print(sam.describe().splitlines()[0])
    for step in range(args.steps):
        tokens = batch(step, args.batch, args.length, vocab, rank, world).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(inputs).reshape(-1, vocab), targets.reshape(-1))

        loss = loss_fn()
        sam.first_step(loss, zero_grad=True)  # the cheap ascent: only the norm weights' gradients
        loss_fn().backward()  # the second pass at w + ε, every gradient (FSDP2 reduce-scatters them)
        sam.second_step(zero_grad=True)  # restore w exactly, then the AdamW step
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:>4}: loss {loss.item():.4f}", flush=True)
    # SAM's saved copy (and ε) hold this rank's shards of the perturbed tensors only
    backup = sum(p.to_local().numel() * p.element_size() for p in sam.storage.params)
    if rank == 0:
        print(f"done: {args.steps} SAM-ON steps on {world} processes; SAM's backup on rank 0: {backup} bytes")


if __name__ == "__main__":
    from normsam.train.setup import close_process_group

    main()
    close_process_group()  # joins gloo's threads before the interpreter finalizes (a rank could abort at exit)
