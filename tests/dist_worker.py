"""Worker for the 2-process gloo test of the distributed losses (spawned, so it lives in a module)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def run(rank: int, world: int, init_file: str, out_dir: str, hyper: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from sscl.losses import sscl_loss

        inputs = torch.load(os.path.join(out_dir, "inputs.pt"))
        b = inputs["z1"].shape[0] // world
        local = slice(rank * b, (rank + 1) * b)
        z1 = inputs["z1"][local].clone().requires_grad_(True)
        z2 = inputs["z2"][local].clone().requires_grad_(True)
        per_anchor = sscl_loss(z1, z2, **hyper, mixing=inputs["mixing"], reduction="none")
        loss = per_anchor.mean()
        g1, g2 = torch.autograd.grad(loss, (z1, z2))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        torch.save(
            {"per_anchor": per_anchor.detach(), "mean": mean / world, "g1": g1, "g2": g2},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # Results are on disk. Skip interpreter teardown: torch 2.14's gloo + autograd threads can
    # abort at static destruction ("terminate called without an active exception") after a
    # successful run, which would fail the test for a reason unrelated to the loss.
    os._exit(0)
