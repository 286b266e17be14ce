"""Schedules and the weight-decay mask."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from configs_loader import ROOT, load

from nopejax import cli, config, optimizer, validation


def cfg_with(**optim):
    cfg = config.base_config()
    cfg.train.steps = 100
    cfg.optim.update({"lr": 1.0, "warmup_steps": 10, "decay_steps": 20, "min_lr_ratio": 0.1, **optim})
    return validation.validate(cfg)


def test_warmup_stable_decay():
    lr = optimizer.schedule(cfg_with(schedule="wsd"))
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert all(float(lr(s)) == pytest.approx(1.0) for s in (10, 50, 80))  # stable until the last 20 steps
    assert float(lr(90)) == pytest.approx(0.55) and float(lr(100)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_other_schedules_warm_up_then_follow_their_shape(name):
    lr = optimizer.schedule(cfg_with(schedule=name, decay_steps=0))
    values = np.array([float(lr(s)) for s in range(0, 101, 10)])
    assert values[0] == 0.0 and values[1] == pytest.approx(1.0)
    if name == "constant":
        assert np.allclose(values[1:], 1.0)
    else:
        assert np.all(np.diff(values[1:]) <= 1e-7) and values[-1] == pytest.approx(0.1, abs=1e-6)


def test_weight_decay_skips_norms_and_embeddings_unless_asked():
    params = {"embed": jnp.ones((4, 2)), "final_norm": jnp.ones(2),
              "layers": {"attn_norm": jnp.ones((3, 2)), "wq": jnp.ones((3, 2, 2))}}  # fmt: skip
    mask = optimizer.decay_mask(params, decay_embeddings=False)
    assert mask == {"embed": False, "final_norm": False, "layers": {"attn_norm": False, "wq": True}}
    assert optimizer.decay_mask(params, decay_embeddings=True)["embed"] is True


@pytest.mark.parametrize("total, warmup, decay", [(1, 0, 0), (7, 0, 1), (50, 5, 10), (300, 30, 60)])
def test_fractions_follow_train_steps(total, warmup, decay):
    # configs/tiny.py's 0.1 / 0.2, rounded down so that the two always fit the run
    cfg = load("tiny")
    cfg.train.steps = total
    validation.validate(cfg)
    assert config.schedule_lengths(cfg.optim, total) == (warmup, decay)
    lr, peak = optimizer.schedule(cfg), cfg.optim.lr
    values = np.array([float(lr(s)) for s in range(total + 1)])
    # independent reference: linear warmup from 0, flat at the peak, linear decay to 0 at the end
    stable_end = total - decay
    ref = [peak * s / warmup if s < warmup else peak if s <= stable_end else peak * (total - s) / decay
           for s in range(total + 1)]  # fmt: skip
    np.testing.assert_allclose(values, ref, rtol=1e-6, atol=1e-9)


def test_absolute_steps_still_mean_steps_and_impossible_ones_fail():
    cfg = cfg_with(warmup_steps=10.0, decay_steps=20)
    assert config.schedule_lengths(cfg.optim, 100) == (10, 20)
    for warmup, decay, words in [(101, 0.2, "exceeds train.steps = 100"), (0.7, 0.5, "0.7 of 100 steps"),
                                 (1.5, 0, "whole number"), (-0.1, 0, "whole number")]:  # fmt: skip
        with pytest.raises(config.ConfigError, match=words) as err:
            cfg_with(warmup_steps=warmup, decay_steps=decay)
        assert "Fix:" in str(err.value)


# 20 steps: test_train.py::test_cli_trains_tiny_on_the_offline_corpus (and .ci/run's smoke run), which
# override nothing else that changes training
def test_train_steps_alone_is_enough(tmp_path):
    # the most common override, with no warmup/decay overrides beside it: 1 step, where both fractions round to 0
    steps = 1
    args = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path),
            f"--config.train.steps={steps}", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and np.isfinite(records[-1]["loss"])
