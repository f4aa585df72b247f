"""Every loss aggregation gives the same gradient in 2 processes (gloo) as in one, the way the RL
loop uses it: each process scales its micro-batch's part of the minibatch loss (`rl.agg_loss` with
the minibatch's global token and response counts) by the world size, and DDP averages gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from align.rl import LOSS_AGG_MODES, agg_loss


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 0, 4, 6, 2, 3, 5])  # uneven, one empty response
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    weight = torch.randn(T, generator=g, dtype=torch.float64)
    return x, mask, weight


def grad(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, mode: str, world: int,
         global_tokens: torch.Tensor, global_seqs: torch.Tensor) -> torch.Tensor:
    w = weight.clone().requires_grad_(True)
    loss_mat = (x * w) ** 2  # (B, T), a loss with a parameter in it
    (agg_loss(loss_mat, mask, mode, global_tokens=global_tokens, global_seqs=global_seqs, max_len=6) * world).backward()
    return w.grad


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, mask, weight = batch()
        rows = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares, as a ragged split gives
        tokens = mask[rows].sum()
        seqs = torch.tensor(float(mask[rows].shape[0]), dtype=torch.float64)
        for t in (tokens, seqs):
            dist.all_reduce(t)  # the minibatch's counts over every process (accelerator.reduce "sum")
        for mode in LOSS_AGG_MODES:
            g = grad(x[rows], mask[rows], weight, mode, 2, tokens, seqs)
            dist.all_reduce(g)
            out[(rank, mode)] = (g / 2).tolist()  # DDP averages the gradients
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_aggregation_gives_one_process_gradient_in_two_processes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(worker, args=(port, out), nprocs=2, join=True)
    x, mask, weight = batch()
    for mode in LOSS_AGG_MODES:
        one = grad(x, mask, weight, mode, 1, mask.sum(), torch.tensor(8.0, dtype=torch.float64))
        assert one.abs().sum() > 0, mode
        for rank in (0, 1):
            torch.testing.assert_close(torch.tensor(out[(rank, mode)], dtype=torch.float64), one, rtol=1e-12,
                                       atol=1e-12, msg=mode)
