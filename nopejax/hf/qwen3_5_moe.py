"""Qwen3.5 MoE, the text model (transformers `models/qwen3_5_moe/modeling_qwen3_5_moe.py`,
`configuration_qwen3_5_moe.py`: Qwen3_5MoeForCausalLM, config class Qwen3_5MoeTextConfig, model_type
`qwen3_5_moe_text`).

Qwen3.5's layers (hf/qwen3_5.py: Qwen3-Next's attention and norms, the Gated DeltaNet with unfused input
projections, text mRoPE as partial RoPE) with Qwen3-Next's sparse MoE block as every layer's FFN
(Qwen3_5MoeDecoderLayer builds Qwen3_5MoeSparseMoeBlock on each): softmax top-k over `num_experts`,
always renormalised (Qwen3_5MoeTopKRouter divides the top-k by their sum; the config has no
norm_topk_prob), and one shared SwiGLU of `shared_expert_intermediate_size` behind a sigmoid gate
(model.shared_expert_gate), a whole number of routed experts wide in nopejax. The config has no
decoder_sparse_step, mlp_only_layers or intermediate_size; an `intermediate_size` in config.json (nopejax's
export writes model.d_ff there) is read by no layer.

The expert rows are Qwen3-Next's (hf/qwen3_next.py: router `mlp.gate.weight`, experts saved one Linear per
expert as save_pretrained writes them, shared expert and its gate, no expert bias); the rest are Qwen3.5's.
The published checkpoints (Qwen/Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B) are multimodal
Qwen3_5MoeForConditionalGeneration directories: refused in one line with the fix
`Qwen3_5MoeForCausalLM.from_pretrained(dir).save_pretrained(text_dir)`, read as hf/qwen3_5.py describes.
"""

from __future__ import annotations

from nopejax.hf import fields, qwen3_5, qwen3_next
from nopejax.hf.fields import Field, HFConfigError, harmless, only

EXPORTS = (*qwen3_5.EXPORTS, "shared_expert_gate")
MIXERS = qwen3_5.MIXERS
FFNS = ("moe",)
IMPORT_OUTERS = qwen3_5.IMPORT_OUTERS


def read_experts(name, value, hf):
    """num_experts: every layer MoE, Qwen3-Next's row with its routing fixed as Qwen3.5 MoE computes it (no
    dense layer, top-k renormalised)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HFConfigError(name, value, "every Qwen3.5 MoE layer routes over its experts: needs at least one",
                            "fix the value in config.json")  # fmt: skip
    fixed = {**hf, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    return qwen3_next.read_experts(name, value, fixed)


def read_unused_width(name, value, hf):
    """intermediate_size: no layer is dense; kept as model.d_ff when given, so an export writes it back."""
    return {} if value is None else fields.positive_int("d_ff")(name, value, hf)


GUIDE_ROW = (
    qwen3_5.GUIDE_ROW[0],
    "Gated DeltaNet (unfused projections) or full attention (partial RoPE; text mRoPE); MoE on every layer",
    "softmax top-k, renormalised; a shared expert behind a sigmoid gate; untied or tied head",
)

_DENSE_ONLY = ("intermediate_size",)
MOE_DEFAULTS = dict(hidden_size=2048, num_hidden_layers=40, num_key_value_heads=2)  # where its class's differ
FIELDS = {
    **{name: row for name, row in qwen3_5.FIELDS.items() if name not in _DENSE_ONLY},
    # Qwen3_5MoeTextConfig's defaults (the 35B-A3B shape)
    **{name: qwen3_5.FIELDS[name]._replace(default=value) for name, value in MOE_DEFAULTS.items()},
    "intermediate_size": Field(None, read_unused_width),
    "num_experts": Field(256, read_experts),
    # read by the num_experts row
    "moe_intermediate_size": Field(512, harmless),
    "shared_expert_intermediate_size": Field(512, harmless),
    "num_experts_per_tok": Field(8, harmless),
    # Qwen3-Next fields a config.json may carry: transformers' Qwen3.5 MoE ignores them, so they must say what it does
    "norm_topk_prob": Field(True, only(True, problem="Qwen3_5MoeTopKRouter renormalises the top-k weights whatever "
                                       "this says", fix="set it true or delete it")),
    "decoder_sparse_step": Field(1, only(1, problem="every Qwen3.5 MoE layer is MoE whatever this says",
                                         fix="set it to 1 or delete it")),
    "mlp_only_layers": Field(None, only(None, [], problem="every Qwen3.5 MoE layer is MoE whatever this says",
                                        fix="make it [] or delete it")),
    "output_router_logits": Field(False, harmless),  # what the forward returns
    "router_aux_loss_coef": Field(0.001, harmless),  # a training loss weight, not in the forward
}  # fmt: skip
BASE = qwen3_5.BASE
LACKS = (
    *qwen3_next.LACKS,
    ("router_normalize", lambda m: not m.router_normalize, "un-normalised top-k weights (its router renormalises)"),
)
_MOE_ROWS = ("router", ("expert_gate", "expert_up", "expert_down"), "shared_gate", "shared_up", "shared_down",
             "shared_out_gate", "expert_bias")  # fmt: skip
LAYER_MAP = {
    **qwen3_5.ATTENTION,
    qwen3_next.GDN_PARAMS: qwen3_5.GDN_ROW,
    **{key: qwen3_next.LAYER_MAP[key] for key in _MOE_ROWS},
}
# Qwen3-Next's config.json entries that Qwen3.5 MoE fixes
_FIXED_KEYS = ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")
check_params = fields.no_expert_bias(
    "Qwen3_5Moe", "export to afmoe, or train Qwen3.5 MoE models with expert_bias_rate = 0"
)


def config_json(m) -> dict:
    return {k: v for k, v in qwen3_next.config_json(m).items() if k not in _FIXED_KEYS}
