"""nopejax: pretrain decoder LMs that mix RoPE and NoPE layers, in JAX/Flax NNX."""

from nopejax.config import ConfigError, base_config
from nopejax.decode import generate
from nopejax.hf import from_hf, to_hf
from nopejax.model import Decoder
from nopejax.validation import validate

__all__ = ["ConfigError", "Decoder", "base_config", "from_hf", "generate", "load_model", "to_hf", "validate"]


def load_model(workdir: str, step: int | None = None) -> Decoder:
    """The model of a run's checkpoint (the newest by default), params in host-local arrays."""
    from nopejax import checkpoint

    return checkpoint.load_model(workdir, step)
