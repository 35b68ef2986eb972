"""SSCL on 2 real gloo processes equals the single-process loss on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from sscl.losses import Mixing, sscl_loss

pytestmark = pytest.mark.integration

WORLD = 2


@pytest.mark.parametrize("mode", ["mix", "copy"])
def test_two_gloo_ranks_equal_one_process(tmp_path, mode):
    b_global, k = 6, 4
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(b_global, 8, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(z1 + 0.4 * torch.randn(b_global, 8, generator=g, dtype=torch.float64), dim=1)
    mixing = Mixing(
        torch.randint(2 * b_global, (2 * b_global, k), generator=g),
        torch.randint(2 * b_global, (2 * b_global, k), generator=g),
        torch.rand(2 * b_global, k, generator=g, dtype=torch.float64),
    )
    hyper = dict(temperature=0.5, beta=1.0, tau_plus=0.1, n_hard=4, n_synthetic=k, mode=mode)
    torch.save({"z1": z1, "z2": z2, "mixing": tuple(mixing)}, tmp_path / "inputs.pt")
    mp.start_processes(
        dist_worker.run,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), hyper),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )

    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    single = sscl_loss(a1, a2, **hyper, mixing=mixing, reduction="none")
    s1, s2 = torch.autograd.grad(single.mean(), (a1, a2))
    b = b_global // WORLD
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        rows = torch.cat([torch.arange(b) + rank * b, torch.arange(b) + rank * b + b_global])
        torch.testing.assert_close(out["per_anchor"], single.detach()[rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["mean"], single.detach().mean(), rtol=1e-10, atol=1e-10)
        # The gather's backward sums every rank's contribution; DDP's gradient averaging then divides
        # by the world size, so parameter gradients equal the single-process ones.
        local = slice(rank * b, (rank + 1) * b)
        torch.testing.assert_close(out["g1"] / WORLD, s1[local], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["g2"] / WORLD, s2[local], rtol=1e-10, atol=1e-10)
