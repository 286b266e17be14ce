"""Load a config file from the repo's configs/ by name."""

import pathlib

from nopejax import config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(name):
    return config.load_config(str(ROOT / "configs" / f"{name}.py"))
