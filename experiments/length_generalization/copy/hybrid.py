"""Copy task (inputs of 1-20 letters, tested on 1-40), NoPE every 4th layer as SmolLM3:
RoPE, RoPE, RoPE, NoPE.

The recipe shared by the four arms, and what was tried: experiments/length_generalization/recipes.py.
"""

import os
import runpy


def get_config():
    recipes = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "recipes.py"))
    return recipes["recipe"]("copy", "hybrid")
