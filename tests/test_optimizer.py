"""Schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from nopejax import config, optimizer


def cfg_with(**optim):
    cfg = config.base_config()
    cfg.train.steps = 100
    cfg.optim.update({"lr": 1.0, "warmup_steps": 10, "decay_steps": 20, "min_lr_ratio": 0.1, **optim})
    return config.validate(cfg)


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
