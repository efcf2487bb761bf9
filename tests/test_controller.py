"""The SwiReasoning controller on synthetic entropy sequences."""
import pytest
import torch

from dlmom.controller import EXPLICIT, LATENT, Controller

FALLING = [0.9, 0.7, 0.5, 0.3, 0.25, 0.2, 0.15, 0.1]
RISING = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def run(controller, columns):
    return [controller.step(torch.tensor(col)).tolist() for col in zip(*columns)]


def test_falling_goes_explicit_and_rising_stays_latent_per_row():
    c = Controller(2, block_size=4)
    modes = run(c, [FALLING, RISING])
    assert [m[0] for m in modes] == [LATENT] * 3 + [EXPLICIT] * 5  # decided at the first block end
    assert [m[1] for m in modes] == [LATENT] * 8
    assert [(e.row, e.step, e.to) for e in c.events] == [(0, 3, "explicit")]
    assert "falling" in c.events[0].reason


def test_rising_after_explicit_returns_to_latent():
    c = Controller(1, block_size=4, start="explicit")
    modes = run(c, [RISING])
    assert modes[3] == [LATENT] and "rising" in c.events[0].reason


def test_flat_high_is_latent_and_flat_low_is_explicit():
    c = Controller(2, block_size=4, start="explicit", entropy_threshold=0.3)
    run(c, [[0.6] * 4, [0.05] * 4])
    assert c.mode.tolist() == [LATENT, EXPLICIT]
    assert "flat and high" in c.events[0].reason


def test_noisy_fall_keeps_the_mode():
    c = Controller(1, block_size=4, variance_threshold=0.001)
    run(c, [[0.9, 0.2, 0.8, 0.1]])
    assert c.mode.tolist() == [LATENT] and not c.events


def test_switch_cap_forces_explicit():
    c = Controller(1, block_size=2, max_switches=2, max_latent_steps=1000)
    zigzag = [0.9, 0.5, 0.5, 0.9, 0.9, 0.5, 0.5, 0.9, 0.9, 0.5]  # falling, rising, falling, rising...
    modes = run(c, [zigzag])
    assert c.switches.tolist() == [2] and bool(c.locked[0])
    assert modes[-1] == [EXPLICIT] and "switch cap" in c.events[-1].reason


def test_latent_cap_forces_explicit():
    c = Controller(1, block_size=4, max_latent_steps=5)
    modes = run(c, [[0.9] * 10])
    assert [m[0] for m in modes] == [LATENT] * 5 + [EXPLICIT] * 5
    assert int(c.latent_steps[0]) == 5 and "latent cap" in c.events[-1].reason


@pytest.mark.parametrize("kind, expected", [("explicit", EXPLICIT), ("latent", LATENT)])
def test_fixed_controllers(kind, expected):
    c = Controller(3, kind=kind, max_latent_steps=100)
    modes = run(c, [RISING, FALLING, [0.5] * 8])
    assert all(m == [expected] * 3 for m in modes) and not c.events


def test_inactive_rows_are_left_alone():
    c = Controller(2, block_size=2)
    for h in FALLING[:4]:
        c.step(torch.tensor([h, h]), active=torch.tensor([True, False]))
    assert c.mode.tolist() == [EXPLICIT, LATENT]
    assert c.latent_steps.tolist() == [1, 0]


def test_unknown_controller():
    with pytest.raises(ValueError, match="controller must be one of"):
        Controller(1, kind="auto")
