"""nopejax: pretrain decoder LMs that mix RoPE and NoPE layers, in JAX/Flax NNX."""

import json
import os

from nopejax import config, hf, validation
from nopejax.config import ConfigError, base_config
from nopejax.decode import generate
from nopejax.hf import to_hf
from nopejax.model import Decoder
from nopejax.validation import validate

__all__ = ["ConfigError", "Decoder", "base_config", "from_hf", "generate", "load_model", "to_hf", "validate"]


def from_hf(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> Decoder:
    """A nopejax Decoder with the weights of a transformers checkpoint directory (any registered family).

    Exact or refused: config.json is read field by field (HFConfigError) and the safetensors
    headers are checked against the map (HFTensorError) before any weight is read; the model
    config is then validated as any run's (nopejax/hf/ sits below validation, which reads its registry).
    """
    with open(os.path.join(path, "config.json")) as f:
        m = hf.model_config_from_hf(json.load(f))
    m.dtype, m.param_dtype = dtype, param_dtype
    cfg = config.base_config()
    cfg.model = m
    validation.validate(cfg)
    return hf.build(m, hf.load_params(path, m))


def load_model(workdir: str, step: int | None = None) -> Decoder:
    """The model of a run's checkpoint (the newest by default), params in host-local arrays."""
    from nopejax import checkpoint

    return checkpoint.load_model(workdir, step)
