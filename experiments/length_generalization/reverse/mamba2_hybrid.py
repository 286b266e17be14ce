"""Reverse task (inputs of 1-20 letters, tested on 1-40), three Mamba2 layers and one NoPE full-attention layer:
Mamba2, Mamba2, Mamba2, NoPE attention.

The recipe shared by the arms, and what was tried: experiments/length_generalization/recipes.py.
"""

import os
import runpy


def get_config():
    recipes = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "recipes.py"))
    return recipes["recipe"]("reverse", "mamba2_hybrid")
