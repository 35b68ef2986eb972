"""Every loss on each device against the loop reference in float64, the drawn hard pool, the bf16
autocast grid, and a registered encoder's pt2 archive: on the CPU always, on CUDA when torch sees a GPU.
``make gpu-check`` runs the same checks
(``tests/device_checks.py``) on a GPU machine that may lack pytest."""

from __future__ import annotations

import pytest
import torch

import device_checks
from device_checks import LOSSES, TOLERANCE

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_matches_the_loop_reference_in_float64(device, loss):
    errors = device_checks.reference_errors(loss, torch.device(device))
    assert len(errors) == len(device_checks.REFERENCE_SETTINGS)
    assert all(0 <= e <= TOLERANCE for e in errors.values()), errors  # a NaN fails too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,n_hard", device_checks.DRAW_SETTINGS)
def test_drawn_parents_are_the_hard_pool(device, b, n_hard):
    wrong, problems = device_checks.draw_problems(b, n_hard, torch.device(device))
    assert wrong == 0 and problems == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_grads_are_finite_under_bf16_autocast(device, loss):
    failures, cases, worst_rel = device_checks.bf16_failures(loss, torch.device(device))
    settings = 1
    for key in device_checks.GRID_KEYS[loss]:
        settings *= len(device_checks.GRID[key])
    assert cases == len(device_checks.VIEW_KINDS) * settings * 2  # float32 and bf16 inputs
    assert failures == []
    assert 0 <= worst_rel < 1  # bf16 moves the loss by about 1e-2; far more is not rounding


@pytest.mark.parametrize("device", DEVICES)
def test_queue_loss_matches_its_loop_reference_in_float64(device):
    assert 0 <= device_checks.moco_reference_error(torch.device(device)) <= TOLERANCE


@pytest.mark.parametrize("device", DEVICES)
def test_queue_loss_and_grad_are_finite_under_bf16_autocast(device):
    bad, cases = device_checks.moco_bf16_failures(torch.device(device))
    assert (bad, cases) == ([], 3)


def test_a_slightly_wrong_loss_is_caught(monkeypatch):
    # NT-Xent at a slightly different temperature: finite, close, and wrong.
    real = device_checks.nt_xent
    monkeypatch.setattr(device_checks, "nt_xent", lambda a, c, *, temperature: real(a, c, temperature=temperature * 1.001))
    assert max(device_checks.reference_errors("nt_xent", torch.device("cpu")).values()) > 1e-6
    assert device_checks.bf16_failures("nt_xent", torch.device("cpu"))[0] == []  # finite, so stable


@pytest.mark.parametrize("device", DEVICES)
def test_a_registered_encoders_archive_gives_the_modules_features_on_the_device(device):
    assert 0 <= device_checks.encoder_archive_error(torch.device(device)) <= device_checks.ENCODER_TOLERANCE
