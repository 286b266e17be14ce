"""The HF families nopejax converts: one line each, read by the CLI help, the docs, the error
messages and tests/hf/. A family is its line here plus its module nopejax/hf/<name>.py, which holds
the family's config.json rows (FIELDS, BASE, MIXERS, FFNS, LACKS, config_json), tensor map (LAYER_MAP)
and row of the HF guide's table (GUIDE_ROW) only; a line whose module is absent registers nothing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

from nopejax.hf.fields import Field, architectures
from nopejax.hf.tensors import OUTER, Outer


class Entry(NamedTuple):
    name: str  # model.hf_family, and the module nopejax/hf/<name>.py
    model_type: str  # config.json's model_type
    architecture: str  # the causal-LM class transformers builds
    label: str  # how the CLI help and the docs name it


ENTRIES = (
    Entry("smollm3", "smollm3", "SmolLM3ForCausalLM", "SmolLM3"),
    Entry("llama", "llama", "LlamaForCausalLM", "Llama"),
    Entry("cohere2", "cohere2", "Cohere2ForCausalLM", "Cohere2"),
    Entry("exaone4", "exaone4", "Exaone4ForCausalLM", "EXAONE 4"),
    Entry("afmoe", "afmoe", "AfmoeForCausalLM", "AFMoE (Arcee Trinity)"),
    Entry("llama4", "llama4_text", "Llama4ForCausalLM", "Llama 4"),
    Entry("nemotron_h", "nemotron_h", "NemotronHForCausalLM", "Nemotron-H"),
    Entry("granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridForCausalLM", "Granite 4.0-H"),
    Entry("qwen3_next", "qwen3_next", "Qwen3NextForCausalLM", "Qwen3-Next"),
    Entry("olmo_hybrid", "olmo_hybrid", "OlmoHybridForCausalLM", "OLMo Hybrid"),
    Entry("qwen3_5", "qwen3_5_text", "Qwen3_5ForCausalLM", "Qwen3.5"),
    Entry("qwen3_5_moe", "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "Qwen3.5 MoE"),
)


class Family(NamedTuple):
    name: str  # model.hf_family
    label: str
    model_type: str
    architecture: str
    fields: dict[str, Field]  # every config.json field: its row
    base: dict  # nopejax model fields the family fixes before its rows are read
    layer_map: dict  # param name (or names) -> its HF tensor row(s), see hf/tensors.py
    mixers: tuple  # the LayerSpec.mixer kinds its layers can have ("attention", "mamba2", "none", ...)
    ffns: tuple  # the LayerSpec.ffn kinds its layers can have ("dense", "moe", "none")
    # what the format cannot hold: (model field, does `m` use it, what the format lacks), checked in order
    lacks: tuple
    config: Callable  # model cfg -> the family's own config.json entries
    # refuses (config.ConfigError) params the format cannot hold, before anything is written
    check_params: Callable
    keep_fp32: tuple  # HF tensor name suffixes stored in fp32 whatever the export dtype
    guide_row: tuple  # its row of the HF guide's family table: (block and norms, per layer, the rest)
    outer: Outer  # the embedding's, final norm's and layers' tensor names
    # other spellings of them a checkpoint may use, read on import only (Qwen3.5: model.language_model.*)
    import_outers: tuple
    exports: tuple  # nopejax model fields beyond hf.EXPORTED_FIELDS that this family's config.json expresses


def _load(entry: Entry) -> Family:
    module = importlib.import_module(f"nopejax.hf.{entry.name}")
    return Family(
        name=entry.name,
        label=entry.label,
        model_type=entry.model_type,
        architecture=entry.architecture,
        fields={**module.FIELDS, "architectures": Field(None, architectures(entry.architecture))},
        base={**module.BASE, "hf_family": entry.name},
        layer_map=module.LAYER_MAP,
        mixers=module.MIXERS,
        ffns=module.FFNS,
        lacks=module.LACKS,
        config=module.config_json,
        check_params=getattr(module, "check_params", lambda m, params: None),
        keep_fp32=getattr(module, "KEEP_FP32", ()),
        guide_row=module.GUIDE_ROW,
        outer=getattr(module, "OUTER", OUTER),
        import_outers=getattr(module, "IMPORT_OUTERS", ()),
        exports=getattr(module, "EXPORTS", ()),
    )


_HERE = os.path.dirname(__file__)
REGISTERED = tuple(_load(e) for e in ENTRIES if os.path.exists(os.path.join(_HERE, f"{e.name}.py")))
BY_NAME = {family.name: family for family in REGISTERED}  # model.hf_family -> family
BY_MODEL_TYPE = {family.model_type: family for family in REGISTERED}  # config.json's model_type -> family
NAMES = tuple(BY_NAME)


def labels() -> str:
    """The registered families as prose: "SmolLM3, Llama, ..."."""
    return ", ".join(family.label for family in REGISTERED)
