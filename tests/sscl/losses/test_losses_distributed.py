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


def test_a_moco_step_on_two_gloo_ranks_equals_one_process_and_the_queue_is_the_same_on_both(tmp_path):
    b_global = 6
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(b_global, 5, generator=g, dtype=torch.float64)
    torch.save({"x1": x1, "x2": x1 + 0.3 * torch.randn(b_global, 5, generator=g, dtype=torch.float64)},
               tmp_path / "inputs.pt")
    mp.start_processes(dist_worker.run_moco, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    previous = torch.get_default_dtype()
    try:
        single = dist_worker.moco_step(str(tmp_path))
    finally:
        torch.set_default_dtype(previous)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    close = dict(rtol=1e-10, atol=1e-10)
    # DDP averages the ranks' gradients: the same step as one process on the whole batch.
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, single["loss"], **close)
    for r in ranks:
        for ours, theirs in zip(r["params"] + r["key_params"], single["params"] + single["key_params"]):
            torch.testing.assert_close(ours, theirs, **close)
    # The queue is identical on both ranks: every rank's keys, in rank order (view 1 then view 2 of each rank).
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"]) and ranks[0]["pointer"] == single["pointer"] == 12
    b = b_global // WORLD
    rank_order = torch.cat([torch.arange(b) + rank * b + view * b_global for rank in range(WORLD) for view in (0, 1)])
    torch.testing.assert_close(ranks[0]["queue"][:12], single["queue"][rank_order], **close)
    torch.testing.assert_close(ranks[0]["queue"][12:], single["queue"][12:], **close)
