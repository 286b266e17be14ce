"""Copy task (inputs of 1-20 letters, tested on 1-40), RoPE on sliding-window layers,
NoPE on every 4th, global, layer.

The recipe shared by the four arms, and what was tried: experiments/length_generalization/recipes.py.
"""

import os
import runpy


def get_config():
    recipes = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "recipes.py"))
    return recipes["recipe"]("copy", "local_global")
