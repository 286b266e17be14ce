"""model.mlp_activation: the dense FFN as SwiGLU (default) or relu2 (Nemotron-H's non-gated squared ReLU),
checked against the plain formula; relu2 has no gate params and is refused where nopejax cannot run it."""

import numpy as np
import pytest

import nopejax
from nopejax import config, model, validation


def _relu2_model(**overrides):
    m = config.base_config().model
    m.update(dict(vocab_size=61, d_model=6, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=2, d_ff=7))
    m.update({"mlp_activation": "relu2", "mlp_bias": True, **overrides})
    return m


def test_relu2_mlp_is_the_plain_formula():
    m = _relu2_model()
    rng = np.random.default_rng(0)
    p = {
        "w_up": rng.normal(size=(6, 7)).astype(np.float32),
        "up_bias": rng.normal(size=(7,)).astype(np.float32),
        "w_down": rng.normal(size=(7, 6)).astype(np.float32),
        "down_bias": rng.normal(size=(6,)).astype(np.float32),
    }
    h_BSD = rng.normal(size=(2, 5, 6)).astype(np.float32)
    up = h_BSD @ p["w_up"] + p["up_bias"]
    want = np.maximum(up, 0.0) ** 2 @ p["w_down"] + p["down_bias"]
    got = np.asarray(model.mlp(p, h_BSD, m, np.float32))
    assert (up < 0).any() and (up > 0).any()  # both sides of the ReLU are exercised
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relu2_layers_have_no_gate_params():
    names = model.layer_params(_relu2_model())
    assert "w_gate" not in names and "gate_bias" not in names
    assert {"w_up", "w_down", "up_bias", "down_bias"} <= set(names)
    assert "w_gate" in model.layer_params(_relu2_model(mlp_activation="swiglu"))


@pytest.mark.parametrize(
    "overrides,needle",
    [({"mlp_activation": "gelu"}, "use one of ['swiglu', 'relu2']"), ({"num_experts": 4}, "SwiGLU only")],
)
def test_bad_mlp_activation_is_refused_in_one_line(overrides, needle):
    cfg = config.base_config()
    cfg.model = _relu2_model(**overrides)
    with pytest.raises(config.ConfigError) as err:
        validation.validate(cfg)
    assert err.value.field == "model.mlp_activation" and needle in str(err.value) and "\n" not in str(err.value)


def test_a_relu2_model_is_not_exported_to_a_swiglu_family():
    with pytest.raises(config.ConfigError) as err:
        nopejax.hf.check_exportable(_relu2_model(), "llama")
    assert err.value.field == "model.mlp_activation"
