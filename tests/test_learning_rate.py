"""The training stages' learning-rate schedule (VAR's `lin0`: linear warm-up from wp0·lr, then a decay to
wpe·lr) as a function of the step (`tasks/train_ar.lr_at`, what the trainer calls)."""

from __future__ import annotations

import itertools
import math

import pytest

from nextdetail.conf.model_settings import ARConfig
from nextdetail.stages.train_ar.tasks import lr_at


def _lr(step: int, **settings) -> float:
    return lr_at(ARConfig(**settings), step)


def test_lr_is_vars_base_rate_scaled_by_the_batch_warmed_up_then_decayed_linearly_to_the_floor():
    s = {"steps": 1000, "warmup_steps": 100, "base_lr": 1e-4, "batch_size": 768, "base_batch": 256}
    lr = 3e-4  # 1e-4 · 768 / 256
    assert ARConfig(**s).lr == pytest.approx(lr)
    assert _lr(0, **s) == pytest.approx(0.005 * lr)  # warmup_start
    assert _lr(50, **s) == pytest.approx(lr * (0.005 + 0.995 * 0.5))
    assert _lr(100, **s) == pytest.approx(lr)  # the end of the warm-up is the peak
    assert _lr(550, **s) == pytest.approx(lr * (1 - 0.99 * 0.5))
    assert _lr(1000, **s) == pytest.approx(0.01 * lr)  # min_lr_ratio at the last step
    steps = [_lr(k, **s) for k in range(1001)]
    assert all(a <= b for a, b in itertools.pairwise(steps[:101]))  # rises, then falls
    assert all(a >= b for a, b in itertools.pairwise(steps[100:]))


def test_cosine_and_constant_decays_and_no_warmup():
    s = {"steps": 200, "warmup_steps": 0, "decay": "cosine", "min_lr_ratio": 0.1}
    lr = ARConfig(**s).lr
    assert _lr(0, **s) == pytest.approx(lr) and _lr(200, **s) == pytest.approx(0.1 * lr)
    assert _lr(100, **s) == pytest.approx(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert {_lr(k, steps=200, warmup_steps=10, decay="constant") for k in range(10, 201)} == {
        ARConfig(steps=200).lr}
