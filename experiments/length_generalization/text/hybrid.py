"""Length-generalization experiment, NoPE every 4th layer (SmolLM3): RoPE, RoPE, RoPE, NoPE, RoPE, RoPE.

configs/tiny.py with only `model.no_rope_layer_interval = 4` changed; the three experiment
configs (text/rope.py, text/hybrid.py, text/nope.py) differ in nothing else. The text study: train on the
offline corpus at length 128, then `nopejax eval-length --lengths 128,256,512,1024`
(`python -m experiments.length_generalization.run --tasks text` runs it). The synthetic tasks have
their own recipes: experiments/length_generalization/{copy,reverse,passkey}/.
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3, "configs", "tiny.py"))
    cfg.model.no_rope_layer_interval = 4
    return cfg
