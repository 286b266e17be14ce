"""Length-generalization experiment, all RoPE: every layer rotates q and k (Llama).

configs/tiny.py with only `model.no_rope_layer_interval = 0` changed (the text study: text/__init__.py).
"""

import os

from nopejax.config import load_config


def get_config():
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 3, "configs", "tiny.py"))
    cfg.model.no_rope_layer_interval = 0
    return cfg
