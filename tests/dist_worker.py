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


class Linear(torch.nn.Module):
    """A model without BatchNorm (its keys do not depend on how the batch is split): (N, 5) -> (features, z)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.nn.functional.normalize(self.net(x), dim=1)


def moco_step(out_dir: str, rank: int = 0, world: int = 1) -> dict:
    """One MoCo training step on this rank's share of ``inputs.pt`` (all of it in one process)."""
    from sscl.losses import get_loss
    from sscl.moco import MomentumQueue
    from sscl.train import train_one_epoch

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = Linear()
    inputs = torch.load(os.path.join(out_dir, "inputs.pt"))
    b = inputs["x1"].shape[0] // world
    local = slice(rank * b, (rank + 1) * b)
    moco = MomentumQueue(model, queue_size=20, momentum=0.9, total_steps=10, dim=4, seed=0)
    step_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = get_loss("hcl", "moco", temperature=0.3, beta=1.0, tau_plus=0.1)
    batch = {"view1": inputs["x1"][local], "view2": inputs["x2"][local]}
    result = train_one_epoch(step_model, [batch], loss_fn, torch.optim.SGD(model.parameters(), lr=0.5),
                             lr_schedule=lambda s: 0.5, moco=moco)
    return {"loss": result.loss, "queue": moco.queue.clone(), "pointer": moco.pointer,
            "params": [p.detach().clone() for p in model.parameters()],
            "key_params": [p.detach().clone() for p in moco.model.parameters()]}


def run_moco(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(moco_step(out_dir, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in ``run``
