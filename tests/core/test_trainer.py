import pytest
import torch
from concept_guard.core.errors import TrainingDivergedError
from concept_guard.core.trainer import optimise


def test_optimise_reduces_loss_and_reports_steps():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    seen = []
    r = optimise(
        [p],
        lambda s, g: (p**2).sum(),
        iterations=50,
        lr=0.1,
        seed=0,
        device=torch.device("cpu"),
        on_step=lambda s, n, loss: seen.append((s, n)),
    )
    assert r.iterations == 50 and len(r.losses) == 50 and r.losses[-1] < r.losses[0] * 0.1
    assert seen[0] == (1, 50) and seen[-1] == (50, 50)


def test_nan_loss_stops_with_clear_error():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    with pytest.raises(TrainingDivergedError, match=r"nan at step 3/10.*lr=0.5"):
        optimise(
            [p],
            lambda s, g: p.sum() * (float("nan") if s == 2 else 1.0),
            iterations=10,
            lr=0.5,
            seed=0,
            device=torch.device("cpu"),
        )


def test_interrupt_from_callback_propagates():
    p = torch.nn.Parameter(torch.tensor([1.0]))

    class Stop(Exception):
        pass

    def cb(step, total, loss):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        optimise(
            [p], lambda s, g: p.sum(), iterations=10, lr=0.1, seed=0, device=torch.device("cpu"), on_step=cb
        )


def test_generator_is_seeded():
    draws = []
    p = torch.nn.Parameter(torch.tensor([1.0]))
    for _ in range(2):
        out = []

        def loss(step, gen, out=out):
            out.append(torch.rand(1, generator=gen).item())
            return p.sum()

        optimise([p], loss, iterations=3, lr=1e-9, seed=7, device=torch.device("cpu"))
        draws.append(out)
    assert draws[0] == draws[1] and len(set(draws[0])) == 3
