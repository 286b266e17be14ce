"""The layer spec: what each layer is, and the block plan that runs the stack.

A `LayerSpec` is one small frozen record of everything that makes one layer differ from another,
in three groups: the mixer (attention of a kind and window, a recurrent mixer, or none), the positions
(RoPE or NoPE, its base, width and layout) with the query/key treatment (QK-norm, NoPE
temperature), and the FFN (dense, routed experts, or none). `layer_specs(model_cfg)` gives one
per layer; the block plan, the attention call, the KV-cache decoder and the HF maps all read these
specs, so a new layer kind is a field here, not a branch in each of them. Equal specs trace to the same program.

The block plan: the spec tuple's period is the unit scanned over (MaxText's
`Llama4ScannableBlock`; SmolLM3's 36 layers, NoPE every 4th, are a 4-layer block x 9). The
stack is `block` repeated `num_blocks` times by `lax.scan`, then a `tail` of the layers a
non-periodic depth leaves, unrolled with their own specs (10 layers with NoPE every 4th: a
4-layer block x 2, then 2 layers). Inside a block each maximal run of equal specs is one traced
layer (`runs`). The plan is made over `traced_specs`, where a NoPE layer that differs from a RoPE
layer in nothing but its positions takes that layer's body with a scanned RoPE on/off flag: SmolLM3's
stack is then one layer scanned 36 times. nopejax/model.py executes the plan; nothing here touches arrays.

This module reads validated model configs and imports nothing of nopejax: nopejax.config
validates with these functions, so the imports run config -> layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ml_collections import ConfigDict

ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # HF's names
# The recurrent mixers (nopejax/mixers/kinds.py): Mamba2 and Gated DeltaNet
RECURRENT_MIXERS = ("mamba2", "gated_deltanet")
# model.layer_types: an attention kind, a recurrent mixer, or no mixer ("mlp": an FFN-only layer,
# Nemotron-H's "-")
LAYER_TYPES = (*ATTENTION_TYPES, *RECURRENT_MIXERS, "mlp")
MIXERS = ("attention", *RECURRENT_MIXERS, "none")
FFNS = ("dense", "moe", "none")  # model.ffn_types
ROPE_LAYOUTS = ("half", "interleaved")
# "rms": per head (EXAONE 4, Gemma 3); "rms_proj": over the whole q (k) projection, all heads at once
# (OLMo 2, OLMo Hybrid); both learned, before RoPE. "l2": weightless, after RoPE (Llama 4)
QK_NORMS = ("none", "rms", "rms_proj", "l2")
LEARNED_QK_NORMS = ("rms", "rms_proj")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything that makes one layer differ from another; the block plan, the attention call
    and the HF maps all read this. Equal specs trace to the same program.

    NoPE layers carry the RoPE fields at their defaults, so they compare equal whatever the
    model's RoPE options are; layers without attention (a Mamba2 mixer or none) carry every
    attention and position field at its NoPE default: their order comes from the recurrence.
    """

    # the mixer
    # "attention", a recurrent mixer (RECURRENT_MIXERS) or "none"; keyword-only, so the positional
    # LayerSpec(attention, window) of attention layers keeps its meaning
    mixer: str = dataclasses.field(default="attention", kw_only=True)
    attention: str = "full"  # "full", "sliding" or "chunked"
    window: int = 0  # sliding: W keys including the query itself; chunked: chunk size C; full: 0
    # positions
    rope: str = "global"  # "none" (NoPE), "global" (rope_theta + rope_scaling), "local" (rope_theta_local)
    rotary_fraction: float = 1.0  # partial_rotary_factor
    rope_layout: str = "half"  # "half" or "interleaved"
    # queries and keys
    qk_norm: str = "none"  # QK_NORMS: "none", "rms" / "rms_proj" (learned, before RoPE), "l2" (after RoPE)
    nope_temperature: tuple[float, float] | None = None  # (floor_scale, attn_scale), NoPE layers only
    # the FFN
    ffn: str = "dense"  # "dense" (model.mlp_activation, d_ff), "moe" (routed experts, nopejax/moe.py) or "none"
    # where the norms sit (model.block; a recurrent mixer's layer: model.recurrent_block where set)
    block: str = dataclasses.field(default="pre_norm", kw_only=True)
    # the traced body of RoPE and NoPE layers alike (`traced_specs`): whether this layer rotates
    # is a scanned per-layer flag, and a NoPE layer rotates by angle 0 (an exact identity)
    rope_flag: bool = dataclasses.field(default=False, kw_only=True)

    @property
    def use_rope(self) -> bool:
        return self.rope != "none"

    @property
    def local(self) -> bool:
        return self.attention != "full"


# ---------------------------------------------------------------------------------------------
# Per-layer patterns from the config fields, then the specs


def rope_pattern(m: ConfigDict) -> tuple[bool, ...]:
    """Per layer: True = RoPE layer, False = NoPE layer, as the fields say; a layer without attention
    takes no positions whatever this says (`layer_specs`)."""
    if m.no_rope_layers is not None:
        return tuple(bool(x) for x in m.no_rope_layers)
    interval = m.no_rope_layer_interval
    if interval == 0:
        return (True,) * m.num_layers
    return tuple((i + 1) % interval != 0 for i in range(m.num_layers))


def layer_types(m: ConfigDict) -> tuple[str, ...]:
    """Per layer, its `LAYER_TYPES` name: explicit list, periodic shorthand, or all full attention."""
    if m.layer_types is not None:
        return tuple(m.layer_types)
    interval = m.global_attention_interval
    if not interval:
        return ("full_attention",) * m.num_layers
    local = "chunked_attention" if m.sliding_window is None and m.attention_chunk_size else "sliding_attention"
    return tuple("full_attention" if (i + 1) % interval == 0 else local for i in range(m.num_layers))


def ffn_pattern(m: ConfigDict) -> tuple[str, ...]:
    """Per layer: "dense", "moe" or "none": the explicit `ffn_types`, else the first num_dense_layers
    dense, then every moe_layer_interval-th MoE."""
    if m.ffn_types is not None:
        return tuple(m.ffn_types)
    if not m.num_experts:
        return ("dense",) * m.num_layers
    moe = [i >= m.num_dense_layers and (i + 1) % m.moe_layer_interval == 0 for i in range(m.num_layers)]
    return tuple("moe" if x else "dense" for x in moe)


def _positions(m: ConfigDict, attention: str, use_rope: bool) -> dict:
    """The position and query/key fields of one layer."""
    if use_rope:
        rope = "local" if attention != "full" and m.rope_theta_local is not None else "global"
        return dict(rope=rope, rotary_fraction=float(m.partial_rotary_factor), rope_layout=m.rope_layout,
                    qk_norm=m.qk_norm)  # fmt: skip
    temperature = None if m.nope_temperature is None else tuple(float(x) for x in m.nope_temperature)
    qk_norm = m.qk_norm if m.qk_norm in LEARNED_QK_NORMS else "none"  # L2 QK-norm is for RoPE layers only (Llama 4)
    return dict(rope="none", qk_norm=qk_norm, nope_temperature=temperature)


def layer_specs(m: ConfigDict) -> tuple[LayerSpec, ...]:
    """One frozen spec per layer, from a validated model config."""
    specs = []
    for kind, use_rope, ffn in zip(layer_types(m), rope_pattern(m), ffn_pattern(m)):
        if kind not in ATTENTION_TYPES:
            mixer = "none" if kind == "mlp" else kind
            block = m.recurrent_block if mixer != "none" and m.recurrent_block is not None else m.block
            specs.append(LayerSpec(mixer=mixer, rope="none", ffn=ffn, block=block))  # no positions
            continue
        attention = kind.removesuffix("_attention")
        window = {"full": 0, "sliding": m.sliding_window, "chunked": m.attention_chunk_size}[attention]
        specs.append(LayerSpec(attention, window, **_positions(m, attention, use_rope), ffn=ffn, block=m.block))
    return tuple(specs)


def _as_nope(spec: LayerSpec) -> LayerSpec:
    """The NoPE layer a RoPE layer would be with its positions taken away (`_positions`' NoPE fields)."""
    return dataclasses.replace(spec, rope="none", rotary_fraction=1.0, rope_layout="half")


def traced_specs(m: ConfigDict) -> tuple[LayerSpec, ...]:
    """The specs the scanned block plan traces: `layer_specs`, where `model.shared_rope_body` merges
    each NoPE attention layer with the RoPE layer it equals but for its positions.

    Both then carry the RoPE spec with `rope_flag` set, so SmolLM3's RoPE x3 + NoPE block is one
    traced layer scanned 4 times (as MaxText's block), not two; the model passes each layer's
    RoPE on/off as scanned data, and a NoPE layer's rotation is by angle 0: cos 1, sin 0, the
    identity to the bit. Layers whose NoPE form differs otherwise (Llama 4's query temperature on
    NoPE layers and L2 QK-norm on RoPE layers; a window on one of them) keep their own bodies. YaRN
    scales cos and sin by its attention factor, which a NoPE layer must not get: not merged. The
    unrolled stack (`scan_layers=False`) traces each layer anyway and keeps the plain specs.
    """
    specs = layer_specs(m)
    scaling = m.rope_scaling or {}
    if not (m.scan_layers and m.shared_rope_body) or scaling.get("rope_type", scaling.get("type")) == "yarn":
        return specs
    rotating = {_as_nope(s): s for s in specs if s.mixer == "attention" and s.use_rope and s.qk_norm != "l2"}
    twin = {s: rotating[s] for s in specs if s.mixer == "attention" and not s.use_rope and s in rotating}
    merged = set(twin.values())
    out = []
    for spec in specs:
        body = twin.get(spec, spec)
        out.append(dataclasses.replace(body, rope_flag=True) if body in merged else spec)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The block plan


def block_structure(pattern: Sequence) -> tuple[tuple, int, tuple]:
    """Split a per-layer pattern (flags or LayerSpecs) into (block, num_blocks, tail).

    `block` repeated `num_blocks` times followed by `tail` reproduces the pattern exactly.
    The period is chosen to minimise the traced layers (len(block) + len(tail)), ties going to
    the shorter block: SmolLM3's 36 layers give a 4-layer block x 9 and no tail; 10 layers with
    NoPE every 4th give a block of 4 x 2 and a 2-layer tail that is unrolled.
    """
    n = len(pattern)
    best = None
    for p in range(1, n + 1):
        reps = n // p
        body = pattern[: reps * p]
        if all(body[i] == body[i % p] for i in range(len(body))):
            traced = p + n - reps * p
            if best is None or traced < best[0]:
                best = (traced, p, reps)
    _, p, reps = best
    return tuple(pattern[:p]), reps, tuple(pattern[reps * p :])


def runs(specs: Sequence) -> list[tuple[int, int, object]]:
    """Maximal runs of equal specs: (start, length, spec). (R, R, R, N) -> [(0, 3, R), (3, 1, N)]."""
    out = []
    for i, spec in enumerate(specs):
        if out and out[-1][2] == spec:
            out[-1] = (out[-1][0], out[-1][1] + 1, spec)
        else:
            out.append((i, 1, spec))
    return out


def period_bodies(specs: Sequence) -> int:
    """Layer bodies the period plan traces: the runs of the block plus those of its tail."""
    block, _, tail = block_structure(specs)
    return len(runs(block)) + len(runs(tail))


def scan_plan(specs: Sequence, m: ConfigDict) -> str:
    """`model.scan_plan` resolved for these layers: "auto" switches where one body per distinct spec
    traces fewer bodies than the period plan (Nemotron-H's 52 layers: 3 against 19) and remat is
    "full" (a switch's backward would otherwise keep every branch's activations)."""
    if m.scan_plan != "auto":
        return m.scan_plan
    fewer = len(set(specs)) < period_bodies(specs)
    return "switch" if fewer and m.remat == "full" else "period"
