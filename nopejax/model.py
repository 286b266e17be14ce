"""A Llama-style decoder (GQA, SwiGLU, RMSNorm) whose per-layer spec and block form are config.

Shape letters: B batch, S sequence, D d_model, H query heads, K kv heads, E head dim, F d_ff,
V vocab, L layers, N scanned blocks, P layers per block.

Parameters of all layers are stacked along a leading `layers` axis ([L, ...]), whatever the
execution plan; the checkpoint layout therefore never depends on `scan_layers`. At call time
the stack is cut into N blocks of one period P of the layer specs (`layers.LayerSpec`: attention
kind and window, RoPE or not and how, QK-norm, temperature; SmolLM3: RoPE, RoPE, RoPE, NoPE;
local/global stacks: sliding RoPE x3, full NoPE) and `lax.scan` runs the blocks, so the traced
program holds one block whatever the depth. Inside a block each sub-layer's spec is a Python
constant. A depth that is not a multiple of the period leaves a tail of layers that are
unrolled with their own specs (`layers.block_structure`); `scan_layers=False` unrolls every
layer, for debugging. A pattern without a short period (Nemotron-H's 52 layers: 19 traced under
the period plan) runs instead as one scan over all layers whose step `lax.switch`es to its layer's
spec (`model.scan_plan`, `layers.scan_plan`): one traced body per distinct spec, each reading its
layer's params from its groups' stacks at a per-group index.

Where the norms sit is `model.block` (`block` below), one function for training and decoding:
`pre_norm` (Llama, SmolLM3), `parallel` (Cohere2: attention and MLP read one norm's output, both
added to the residual), `post_norm` (EXAONE 4: each sublayer's output normed before the residual
add, inputs not normed) and `sandwich` (Gemma 3, Arcee Trinity: both). `model.norm` is `rms` or
`layernorm` (Cohere2's: mean-subtracted, no bias); `model.logit_scale` multiplies the logits. The form
is per layer (`LayerSpec.block`): `model.recurrent_block` gives the recurrent-mixer layers their own
(OLMo Hybrid: post_norm attention layers, pre_norm Gated DeltaNet layers), and each norm weight is
stacked over the layers whose form has it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from nopejax import attention, config, embedding, layers, moe
from nopejax import rope as rope_lib
from nopejax.mixers import kinds as mixer_kinds
from nopejax.sharding import constrain, constrain_dividing, dividing_axes, mesh_axes, mesh_size

# name -> (shape given the model config, logical axes); the leading `layers` axis is implied.
LAYER_PARAMS = {
    "attn_norm": (lambda m: (m.d_model,), ("norm",)),
    "wq": (lambda m: (m.d_model, m.num_heads, m.head_dim), ("embed", "heads", "head_dim")),
    "wk": (lambda m: (m.d_model, m.num_kv_heads, m.head_dim), ("embed", "kv_heads", "head_dim")),
    "wv": (lambda m: (m.d_model, m.num_kv_heads, m.head_dim), ("embed", "kv_heads", "head_dim")),
    "wo": (lambda m: (m.num_heads, m.head_dim, m.d_model), ("heads", "head_dim", "embed")),
    "mlp_norm": (lambda m: (m.d_model,), ("norm",)),
    "w_gate": (lambda m: (m.d_model, m.d_ff), ("embed", "mlp")),
    "w_up": (lambda m: (m.d_model, m.d_ff), ("embed", "mlp")),
    "w_down": (lambda m: (m.d_ff, m.d_model), ("mlp", "embed")),
}

# model.qk_norm = "rms": a learned per-head-dim RMSNorm weight on q and on k (EXAONE 4, Gemma 3);
# "rms_proj": one RMSNorm over all heads' q (k) together, its weight per head and dim (OLMo 2, OLMo Hybrid)
QK_NORM_PARAMS = {
    "rms": {
        "q_norm": (lambda m: (m.head_dim,), ("head_dim",)),
        "k_norm": (lambda m: (m.head_dim,), ("head_dim",)),
    },
    "rms_proj": {
        "q_norm": (lambda m: (m.num_heads, m.head_dim), ("heads", "head_dim")),
        "k_norm": (lambda m: (m.num_kv_heads, m.head_dim), ("kv_heads", "head_dim")),
    },
}

# model.attention_gate (AFMoE): a projection of the normed layer input whose sigmoid multiplies the
# attended values, per head and dim, before wo
ATTENTION_GATE_PARAMS = {"attn_gate": (lambda m: (m.d_model, m.num_heads, m.head_dim), ("embed", "heads", "head_dim"))}

# Optional projection biases (HF `attention_bias`, `mlp_bias`): name -> (shape, logical axes, the
# config switch). They exist as params only when switched on; added after the matmul, so the
# attention kernel never sees them.
BIAS_PARAMS = {
    "q_bias": (lambda m: (m.num_heads, m.head_dim), ("heads", "head_dim"), "attention_bias"),
    "k_bias": (lambda m: (m.num_kv_heads, m.head_dim), ("kv_heads", "head_dim"), "attention_bias"),
    "v_bias": (lambda m: (m.num_kv_heads, m.head_dim), ("kv_heads", "head_dim"), "attention_bias"),
    "o_bias": (lambda m: (m.d_model,), ("embed",), "attention_bias"),
    "gate_bias": (lambda m: (m.d_ff,), ("mlp",), "mlp_bias"),
    "up_bias": (lambda m: (m.d_ff,), ("mlp",), "mlp_bias"),
    "down_bias": (lambda m: (m.d_model,), ("embed",), "mlp_bias"),
}


# Norms after a sublayer's output (model.block post_norm, sandwich). Each block names the norm
# weights it has; a norm weight is stacked over the layers whose block form lists it (`GROUPS`).
POST_NORM_PARAMS = {
    "attn_post_norm": (lambda m: (m.d_model,), ("norm",)),
    "mlp_post_norm": (lambda m: (m.d_model,), ("norm",)),
}
BLOCK_NORMS = {
    "pre_norm": ("attn_norm", "mlp_norm"),
    "parallel": ("attn_norm",),  # one norm feeds both sublayers
    "post_norm": ("attn_post_norm", "mlp_post_norm"),
    "sandwich": ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"),
}
ALL_BLOCK_NORMS = {name for names in BLOCK_NORMS.values() for name in names}

# A recurrent mixer's params (nopejax/mixers/kinds.py: Mamba2, Gated DeltaNet) are stacked over
# the layers of its kind, named with the kind's prefix (`mamba_in_proj`); their projections hold
# several heads' kinds of vectors side by side, so they are not split over the tensor axis.


def mixer_params(m, kind: mixer_kinds.MixerKind) -> dict:
    d = kind.dims(m)
    return {kind.prefix + name: (lambda _m, fn=fn: fn(d), logical) for name, (fn, logical) in kind.params(d).items()}


# Which layers each per-layer param is stacked over (a param group), by what the layer's spec has:
# the mixer's input/output norms over layers with a mixer whose block form has that norm, attention
# params over attention layers, a recurrent mixer's params over the layers of its kind, the FFN's
# norms over layers with an FFN whose block form has that norm, the dense FFN over dense layers and
# MoE params (moe.moe_params) over MoE layers. A model of attention + dense layers in one block form
# therefore keeps every stack [L, ...].
MIXER_NORMS = ("attn_norm", "attn_post_norm")
FFN_NORMS = ("mlp_norm", "mlp_post_norm")
GROUPS = {
    **{n: (lambda spec, n=n: spec.mixer != "none" and n in BLOCK_NORMS[spec.block]) for n in MIXER_NORMS},
    "attention": lambda spec: spec.mixer == "attention",
    **{name: (lambda spec, name=name: spec.mixer == name) for name in mixer_kinds.KINDS},
    **{n: (lambda spec, n=n: spec.ffn != "none" and n in BLOCK_NORMS[spec.block]) for n in FFN_NORMS},
    "dense": lambda spec: spec.ffn == "dense",
    "moe": lambda spec: spec.ffn == "moe",
}
DENSE_FFN_PARAMS = ("w_gate", "w_up", "w_down", "gate_bias", "up_bias", "down_bias")
# model.mlp_activation "relu2" (Nemotron-H) is not gated: the dense FFN has no gate params
GATE_PARAMS = ("w_gate", "gate_bias")


def param_group(name: str) -> str:
    """Which layers a per-layer param is stacked over: a key of `GROUPS`."""
    if name in moe.MOE_PARAMS or name in moe.SHARED_PARAMS:
        return "moe"
    if name in DENSE_FFN_PARAMS:
        return "dense"
    kind = mixer_kinds.kind_of_param(name)
    if kind is not None:
        return kind.name
    if name in ALL_BLOCK_NORMS:
        return name
    return "attention"


def in_group(spec: layers.LayerSpec, group: str) -> bool:
    return GROUPS[group](spec)


def group_count(specs, group: str) -> int:
    return sum(in_group(spec, group) for spec in specs)


def layer_params(m) -> dict:
    """The per-layer params this config has: name -> (shape fn, logical axes)."""
    biases = {name: (shape_fn, logical) for name, (shape_fn, logical, key) in BIAS_PARAMS.items() if m[key]}
    # every norm weight a block form can have: those of no layer's form have an empty group, left out below
    out = {**LAYER_PARAMS, **POST_NORM_PARAMS, **QK_NORM_PARAMS.get(m.qk_norm, {}), **biases}
    out.update(ATTENTION_GATE_PARAMS if m.attention_gate else {})
    out.update(moe.moe_params(m) if m.num_experts else {})
    if m.mlp_activation == "relu2":
        out = {name: v for name, v in out.items() if name not in GATE_PARAMS}
    specs = layers.layer_specs(m)
    for name, kind in mixer_kinds.KINDS.items():
        out.update(mixer_params(m, kind) if any(spec.mixer == name for spec in specs) else {})
    return {name: v for name, v in out.items() if group_count(specs, param_group(name))}


def stack_size(m, name: str) -> int:
    """Leading size of a per-layer param: the number of layers it is stacked over."""
    return group_count(layers.layer_specs(m), param_group(name))


def slice_layers(params: dict, specs, start: int, stop: int) -> dict:
    """The params of layers start .. stop - 1 of `specs` (each stack cut by its own group's index);
    params of a group with no layer in the range are left out."""
    out = {}
    for name, a in params.items():
        group = param_group(name)
        lo, hi = group_count(specs[:start], group), group_count(specs[:stop], group)
        if hi > lo:
            out[name] = a[lo:hi]
    return out


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dtype(name: str):
    return jnp.dtype(name)


def rms_norm(x_BSD, weight_D, eps: float, unit_offset: bool = False):
    """HF semantics: normalise in fp32, cast back to the input dtype, then scale. With `unit_offset`
    (Qwen3-Next, Gemma) the weight is an offset: scaled by 1 + w in fp32, then cast, as they compute it."""
    x = x_BSD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (x * (1.0 + weight_D.astype(jnp.float32))).astype(x_BSD.dtype)
    return x.astype(x_BSD.dtype) * weight_D.astype(x_BSD.dtype)


def rms_norm_heads(x_BSHE, weight_HE, eps: float, unit_offset: bool = False):
    """`rms_norm` over the heads and head dims together (HF's RMSNorm of the [.., H * E] projection)."""
    B, S, H, E = x_BSHE.shape
    out = rms_norm(x_BSHE.reshape(B, S, H * E), weight_HE.reshape(H * E), eps, unit_offset)
    return out.reshape(B, S, H, E)


def layer_norm(x_BSD, weight_D, eps: float):
    """Cohere2's LayerNorm: mean-subtracted, no bias; normalised and scaled in fp32, then cast back."""
    x = x_BSD.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * weight_D.astype(jnp.float32)).astype(x_BSD.dtype)


def norm(x_BSD, weight_D, m):
    """The model's block and final norm (`model.norm`); eps is `model.rms_norm_eps` for both kinds."""
    if m.norm == "layernorm":
        return layer_norm(x_BSD, weight_D, m.rms_norm_eps)
    return rms_norm(x_BSD, weight_D, m.rms_norm_eps, m.norm_unit_offset)


def _plus_bias(x, p, name: str):
    """x + this layer's `name` bias, if the config has one (a trace-time branch: no op otherwise)."""
    return x + p[name].astype(x.dtype) if name in p else x


def attention_inputs(p, h_BSD, m, dtype, spec: layers.LayerSpec):
    """The q, k, v projections (+ biases) of the sublayer's input and the RMS QK-norm, un-rotated.

    A model's own softmax scale (`model.attention_scale`, Granite's attention_multiplier) is folded
    into q here, since every attention path scales q.k by 1 / sqrt(head_dim)."""
    q_BSHE = _plus_bias(jnp.einsum("bsd,dhe->bshe", h_BSD, p["wq"].astype(dtype)), p, "q_bias")
    k_BSKE = _plus_bias(jnp.einsum("bsd,dke->bske", h_BSD, p["wk"].astype(dtype)), p, "k_bias")
    v_BSKE = _plus_bias(jnp.einsum("bsd,dke->bske", h_BSD, p["wv"].astype(dtype)), p, "v_bias")
    if spec.qk_norm == "rms":  # before RoPE, on every layer (EXAONE 4, Gemma 3)
        q_BSHE = rms_norm(q_BSHE, p["q_norm"], m.rms_norm_eps, m.norm_unit_offset)
        k_BSKE = rms_norm(k_BSKE, p["k_norm"], m.rms_norm_eps, m.norm_unit_offset)
    elif spec.qk_norm == "rms_proj":  # over all heads at once, before RoPE (OLMo 2, OLMo Hybrid)
        q_BSHE = rms_norm_heads(q_BSHE, p["q_norm"], m.rms_norm_eps, m.norm_unit_offset)
        k_BSKE = rms_norm_heads(k_BSKE, p["k_norm"], m.rms_norm_eps, m.norm_unit_offset)
    if m.attention_scale is not None:
        q_BSHE = q_BSHE * jnp.asarray(m.attention_scale * math.sqrt(m.head_dim), q_BSHE.dtype)
    return q_BSHE, k_BSKE, v_BSKE


def attention_output(p, o_BSHE, h_BSD, dtype):
    """Output projection (+ bias) of the attended values, gated first when the model has a gate
    (AFMoE: o * sigmoid(h @ W_gate), h the sublayer's input): the attention sublayer's output."""
    if "attn_gate" in p:
        gate_BSHE = jnp.einsum("bsd,dhe->bshe", h_BSD, p["attn_gate"].astype(dtype))
        o_BSHE = o_BSHE * jax.nn.sigmoid(gate_BSHE)
    return _plus_bias(jnp.einsum("bshe,hed->bsd", o_BSHE, p["wo"].astype(dtype)), p, "o_bias")


def attention_sublayer(p, h_BSD, m, dtype, spec: layers.LayerSpec, attend):
    """The attention mixer on its (normed) input -> (output, what `attend` returned beside o).

    `attend(q, k, v) -> (o, aux)` is the attention itself: over the sequence in training, over the
    KV cache in decoding (aux: the updated cache)."""
    o_BSHE, aux = attend(*attention_inputs(p, h_BSD, m, dtype, spec))
    return attention_output(p, o_BSHE, h_BSD, dtype), aux


def mlp(p, h_BSD, m, dtype):
    """The dense MLP (+ biases) of the sublayer's input: the MLP sublayer's output. `model.mlp_activation`
    "swiglu": silu(h W_gate) * (h W_up) W_down; "relu2" (Nemotron-H, not gated): relu(h W_up)^2 W_down."""
    up_BSF = _plus_bias(jnp.einsum("bsd,df->bsf", h_BSD, p["w_up"].astype(dtype)), p, "up_bias")
    if m.mlp_activation == "relu2":
        act_BSF = jnp.square(jax.nn.relu(up_BSF))
    else:
        gate_BSF = _plus_bias(jnp.einsum("bsd,df->bsf", h_BSD, p["w_gate"].astype(dtype)), p, "gate_bias")
        act_BSF = jax.nn.silu(gate_BSF) * up_BSF
    down_BSD = jnp.einsum("bsf,fd->bsd", act_BSF, p["w_down"].astype(dtype))
    return _plus_bias(down_BSD, p, "down_bias")


def ffn(p, h_BSD, m, dtype, spec: layers.LayerSpec):
    """The FFN sublayer `spec.ffn` names, on its (normed) input -> (output, MoE statistics or None)."""
    if spec.ffn == "moe":
        return moe.moe_ffn(p, h_BSD, m, dtype)
    return mlp(p, h_BSD, m, dtype), None


def block(p, x_BSD, m, dtype, spec: layers.LayerSpec, mix):
    """One layer in the form `spec.block` names -> (x_BSD, what `mix` returned beside its output, MoE stats).

    `mix(h_BSD) -> (out_BSD, aux)` is the mixer sublayer on its normed input (`attention_sublayer`
    or a Mamba2 mixer, in training or decoding); a layer whose spec has no mixer or no FFN skips
    that sublayer with its norms. Norms present only when the block has them (`BLOCK_NORMS`), so an
    absent key is a trace-time branch, not an op. Each sublayer's output is scaled by
    `model.residual_scale` before the residual add (Granite). The FFN is dense or MoE as
    `spec.ffn` says (MoE stats: None for a dense layer or none).
    """
    scaled = (lambda y: y) if m.residual_scale == 1.0 else (lambda y: y * jnp.asarray(m.residual_scale, y.dtype))
    aux = None
    if spec.mixer != "none":
        h_BSD = norm(x_BSD, p["attn_norm"], m) if "attn_norm" in p else x_BSD
        a_BSD, aux = mix(h_BSD)
        if "attn_post_norm" in p:
            a_BSD = norm(a_BSD, p["attn_post_norm"], m)
        if spec.block == "parallel":  # Cohere2: residual + attention + MLP, both from the one norm
            f_BSD, stats = ffn(p, h_BSD, m, dtype, spec)
            return x_BSD + scaled(a_BSD) + scaled(f_BSD), aux, stats
        x_BSD = x_BSD + scaled(a_BSD)
    if spec.ffn == "none":
        return x_BSD, aux, None
    f_BSD, stats = ffn(p, norm(x_BSD, p["mlp_norm"], m) if "mlp_norm" in p else x_BSD, m, dtype, spec)
    if "mlp_post_norm" in p:
        f_BSD = norm(f_BSD, p["mlp_post_norm"], m)
    return x_BSD + scaled(f_BSD), aux, stats


def decoder_layer(p, x_BSD, *, spec: layers.LayerSpec, ctx):
    """One layer as `spec` and `model.block` say -> (x, MoE stats or None). `p`: this layer's params,
    and for a `spec.rope_flag` body its RoPE on/off (`ROPE_ON`, 1.0 or 0.0)."""
    m, dtype = ctx["model_cfg"], ctx["dtype"]
    p = dict(p)
    rope_on = p.pop(ROPE_ON, None)

    def attend(q_BSHE, k_BSKE, v_BSKE):
        o_BSHE = attention.attend(
            q_BSHE,
            k_BSKE,
            v_BSKE,
            positions_BS=ctx["positions"],
            segment_ids_BS=ctx["segment_ids"],
            spec=spec,
            cos_sin=ctx["cos_sin"].get(spec.rope),
            rope=ctx["ropes"].get(spec.rope),
            rope_on=rope_on,
            impl=m.attention_impl,
            norm_eps=m.rms_norm_eps,
        )
        return o_BSHE, None

    def mix(h_BSD):
        if spec.mixer == "attention":
            return attention_sublayer(p, h_BSD, m, dtype, spec, attend)
        kind = mixer_kinds.KINDS[spec.mixer]
        out_BSD, _ = kind.forward(
            mixer_kinds.layer_params(kind, p), h_BSD, kind.dims(m), segment_ids_BS=ctx["segment_ids"]
        )
        return out_BSD, None

    x_BSD, _, stats = block(p, x_BSD, m, dtype, spec, mix)
    return constrain(x_BSD, ("act_batch", "act_seq", "act_embed")), stats


# The per-layer RoPE flag of `layers.traced_specs`' merged bodies, carried beside the attention params
# (its group: param_group of an unknown name is "attention")
ROPE_ON = "rope_on"


def _concat(auxes: list):
    """Per-MoE-layer aux pieces (each [n, ...]) in layer order -> one [L_moe, ...] tree, or None."""
    return jax.tree.map(lambda *a: jnp.concatenate(a), *auxes) if auxes else None


def run_layers(stack, x_BSD, ctx):
    """Apply all L layers -> (x, MoE aux stacked over MoE layers, or None).

    A dense prefix (model.num_dense_layers of an MoE model) is planned on its own, then the rest:
    each part runs as scanned blocks of one period of its layer specs, then its exact tail.
    Inside a block, each run of equal specs is itself a scan, so the traced program holds one
    layer per run; the specs are `layers.traced_specs`, where RoPE and NoPE layers that differ in
    nothing else share one body and a per-layer flag (`ROPE_ON`, stacked beside the attention
    params) says whether it rotates (SmolLM3's RoPE x3 + NoPE: one traced layer, not 4 or 2):
    compile time and the weights gathered at once stay those of about one layer. Remat wraps
    each layer, so only layer inputs are kept for the backward pass. Each param stack is cut by
    its own group's layer index (`slice_layers`: dense FFN, MoE or every layer).
    """
    m = ctx["model_cfg"]
    remat = REMAT_POLICIES.get(m.remat)

    def layer_fn(spec: layers.LayerSpec):
        fn = lambda p, x: decoder_layer(p, x, spec=spec, ctx=ctx)
        return jax.checkpoint(fn, policy=remat, prevent_cse=not m.scan_layers) if remat else fn

    def run(params, x_BSD, specs):  # params: each stacked over its group's layers of `specs`
        auxes = []
        for start, length, spec in layers.runs(specs):
            layer = layer_fn(spec)
            part = slice_layers(params, specs, start, start + length)
            if length == 1 or not m.scan_layers:
                for i in range(length):
                    x_BSD, aux = layer(jax.tree.map(lambda a, i=i: a[i], part), x_BSD)
                    auxes += [] if aux is None else [jax.tree.map(lambda a: a[None], aux)]
            else:
                x_BSD, aux = jax.lax.scan(lambda x, p, layer=layer: layer(p, x), x_BSD, part)
                auxes += [] if aux is None else [aux]
        return x_BSD, _concat(auxes)

    def run_switch(params, x_BSD, specs):
        """One scan over all layers of `specs`; each step `lax.switch`es to its spec's body, which
        reads its layer's params from each group's stack at the layer's index in that group."""
        distinct = list(dict.fromkeys(specs))
        groups = sorted({param_group(name) for name in params})
        index_G = {g: jnp.asarray([group_count(specs[:i], g) for i in range(len(specs))], jnp.int32) for g in groups}
        branch_L = jnp.asarray([distinct.index(spec) for spec in specs], jnp.int32)

        def layer_of(spec):
            def fn(x_BSD, idx):
                p = {name: jax.lax.dynamic_index_in_dim(a, idx[param_group(name)], keepdims=False)
                     for name, a in params.items() if in_group(spec, param_group(name))}  # fmt: skip
                return decoder_layer(p, x_BSD, spec=spec, ctx=ctx)

            return fn

        bodies = [layer_of(spec) for spec in distinct]
        idx0 = {g: i[0] for g, i in index_G.items()}
        # MoE stats of one layer (traced for their shapes once, from one MoE body), if any layer is MoE
        moe_body = next((body for spec, body in zip(distinct, bodies) if spec.ffn == "moe"), None)
        like = None if moe_body is None else jax.eval_shape(moe_body, x_BSD, idx0)[1]

        def padded(body):  # every branch returns the same tree: MoE stats, zeros for other layers
            def fn(x_BSD, idx):
                x_BSD, aux = body(x_BSD, idx)
                if like is not None and aux is None:
                    aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like)
                return x_BSD, aux

            return fn

        branches = [padded(body) for body in bodies]

        def step(x_BSD, xs):
            b, idx = xs
            return jax.lax.switch(b, branches, x_BSD, idx)

        if remat:  # whole steps: the scan keeps each layer's input only, whichever branch it took
            step = jax.checkpoint(step, policy=remat)
        x_BSD, aux_L = jax.lax.scan(step, x_BSD, (branch_L, index_G))
        if like is None:
            return x_BSD, None
        moe_layers = np.asarray([i for i, spec in enumerate(specs) if spec.ffn == "moe"])
        return x_BSD, jax.tree.map(lambda a: a[moe_layers], aux_L)

    def run_part(params, x_BSD, specs):
        if not m.scan_layers:
            return run(params, x_BSD, specs)
        if layers.scan_plan(specs, m) == "switch":
            return run_switch(params, x_BSD, specs)
        block, num_blocks, tail = layers.block_structure(specs)
        P, auxes = len(block), []
        if num_blocks > 1:
            body = slice_layers(params, specs, 0, num_blocks * P)
            blocks = {name: a.reshape(num_blocks, a.shape[0] // num_blocks, *a.shape[1:]) for name, a in body.items()}
            x_BSD, aux = jax.lax.scan(lambda x, p: run(p, x, block), x_BSD, blocks)
            auxes += [] if aux is None else [jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux)]
        elif num_blocks == 1:
            x_BSD, aux = run(slice_layers(params, specs, 0, P), x_BSD, block)
            auxes += [] if aux is None else [aux]
        if tail:
            x_BSD, aux = run(slice_layers(params, specs, num_blocks * P, len(specs)), x_BSD, tail)
            auxes += [] if aux is None else [aux]
        return x_BSD, _concat(auxes)

    specs = layers.traced_specs(m)
    if any(spec.rope_flag for spec in specs):  # each attention layer's RoPE on/off, sliced and scanned as its params
        flags = [spec.use_rope for spec in layers.layer_specs(m) if in_group(spec, "attention")]
        stack = {**stack, ROPE_ON: jnp.asarray(flags, jnp.float32)}
    prefix = m.num_dense_layers if m.num_experts else 0
    auxes = []
    for start, stop in ((0, prefix), (prefix, len(specs))):
        if stop > start:
            x_BSD, aux = run_part(slice_layers(stack, specs, start, stop), x_BSD, specs[start:stop])
            auxes += [] if aux is None else [aux]
    return x_BSD, _concat(auxes)


class Decoder(nnx.Module):
    """Token embedding -> L decoder layers (each as its LayerSpec says) -> final norm -> LM head."""

    def __init__(self, model_cfg: config.ConfigDict, *, rngs: nnx.Rngs):
        # frozen: a module's static attributes must be hashable for nnx.split / jit
        self.cfg = m = ml_collections.FrozenConfigDict(model_cfg)
        pdtype = _dtype(m.param_dtype)
        init = nnx.initializers.normal(m.init_std)

        def param(shape, logical, ones=False, zeros=False):
            ones, zeros = ones and not m.norm_unit_offset, zeros or (ones and m.norm_unit_offset)
            if ones or zeros:  # norms start at 1 (at 0 where 1 + w scales: norm_unit_offset), biases at 0
                value = (jnp.ones if ones else jnp.zeros)(shape, pdtype)
            else:
                value = init(rngs.params(), shape, pdtype)
            return nnx.Param(value, logical_axes=logical)

        self.embed = param((m.vocab_size, m.d_model), ("vocab", "embed"))
        stacks = {}
        for name, (shape_fn, logical) in layer_params(m).items():
            if mixer_kinds.kind_of_param(name) is not None:
                continue
            ones, zeros = name.endswith("norm"), name.endswith("bias")
            stacks[name] = param((stack_size(m, name), *shape_fn(m)), ("layers", *logical), ones=ones, zeros=zeros)
        stacks.update(_mixer_stacks(m, rngs, pdtype))
        self.layers = nnx.Dict(stacks)
        self.final_norm = param((m.d_model,), ("norm",), ones=True)
        self.lm_head = None if m.tie_embeddings else param((m.d_model, m.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BS, positions=None, segment_ids=None):
        """tokens int32 [B, S] -> logits float32 [B, S, V]. Positions default to 0..S-1."""
        return self.logits(self.hidden(tokens_BS, positions, segment_ids))

    def logits(self, x_BSD):
        """Final hidden states -> float32 logits [B, S, V] (tied head: the embedding, transposed),
        times `model.logit_scale` (Cohere2) when it is not 1."""
        return constrain(self.head_logits(x_BSD, self.head(x_BSD.dtype)), ("act_batch", "act_seq", "act_vocab"))

    def head(self, dtype):
        """The LM head [D, V] in the compute `dtype` (tied: the embedding, transposed)."""
        return (self.embed[...].T if self.lm_head is None else self.lm_head[...]).astype(dtype)

    def head_logits(self, x_BSD, head_DV):
        """-> float32 logits [B, S, V] of hidden states under a head from `head`."""
        logits_BSV = jnp.einsum("bsd,dv->bsv", x_BSD, head_DV, preferred_element_type=jnp.float32)
        return logits_BSV * jnp.float32(self.cfg.logit_scale) if self.cfg.logit_scale != 1.0 else logits_BSV

    def embed_tokens(self, tokens_BS):
        """tokens int32 [B, S] -> embeddings [B, S, D] in the compute dtype, times `model.embed_scale`
        (AFMoE's muP input scale; HF scales in the compute dtype too)."""
        # ids travel, not the table: under a mesh no device gathers [V, D] or its gradient (nopejax/embedding.py)
        x_BSD = embedding.lookup(self.embed[...], tokens_BS, _dtype(self.cfg.dtype))
        return x_BSD * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x_BSD

    def hidden(self, tokens_BS, positions=None, segment_ids=None):
        """tokens int32 [B, S] -> final-normed hidden states [B, S, D] in the compute dtype."""
        return self.hidden_and_aux(tokens_BS, positions, segment_ids)[0]

    def hidden_and_aux(self, tokens_BS, positions=None, segment_ids=None):
        """-> (final-normed hidden states [B, S, D], MoE statistics per MoE layer or None)."""
        m = self.cfg
        dtype = _dtype(m.dtype)
        B, S = tokens_BS.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        ropes = layer_ropes(m)
        ctx = {
            "model_cfg": m,
            "dtype": dtype,
            "positions": positions,
            "segment_ids": segment_ids,
            "ropes": ropes,
            # cos/sin are shared by all RoPE layers of a base: computed once, outside the scan
            "cos_sin": {kind: rope_lib.cos_sin(positions, rope, m.rope_layout) for kind, rope in ropes.items()},
        }
        x_BSD = constrain(self.embed_tokens(tokens_BS), ("act_batch", "act_seq", "act_embed"))
        stack = {name: p[...] for name, p in self.layers.items()}
        x_BSD, aux = run_layers(stack, x_BSD, ctx)
        return norm(x_BSD, self.final_norm[...], m), aux


def _mixer_stacks(m, rngs: nnx.Rngs, pdtype) -> dict:
    """The recurrent mixers' params, each layer initialised as its kind says (transformers' init of
    A, dt, D, conv), stacked over the layers of that kind."""
    specs, stacks = layers.layer_specs(m), {}
    for name, kind in mixer_kinds.KINDS.items():
        count = group_count(specs, name)
        if count:
            d = kind.dims(m)
            values = jax.vmap(lambda key, d=d, kind=kind: kind.init(d, key, pdtype))(
                jax.random.split(rngs.params(), count)
            )
            for param, (_, logical) in kind.params(d).items():
                stacks[kind.prefix + param] = nnx.Param(values[param], logical_axes=("layers", *logical))
    return stacks


def layer_ropes(m) -> dict:
    """One frequency table per RoPE base in use, keyed by LayerSpec.rope: "global" (rope_theta +
    rope_scaling) and "local" (rope_theta_local, unscaled)."""
    kinds = {spec.rope for spec in layers.layer_specs(m)} - {"none"}
    f = m.partial_rotary_factor
    make = {
        "global": lambda: rope_lib.make_rope(m.head_dim, m.rope_theta, m.rope_scaling, f),
        "local": lambda: rope_lib.make_rope(m.head_dim, m.rope_theta_local or m.rope_theta, None, f),
    }
    return {kind: make[kind]() for kind in sorted(kinds)}


def param_count(m: config.ConfigDict) -> int:
    stacked = sum(stack_size(m, name) * math.prod(fn(m)) for name, (fn, _) in layer_params(m).items())
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return stacked + embed + m.d_model


def create(model_cfg: config.ConfigDict, seed: int = 0) -> Decoder:
    """Validate nothing here: callers pass configs through `validation.validate` first."""
    return Decoder(model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def split(module: Decoder):
    """-> (graphdef, params): the static structure and a plain nested dict of arrays."""
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, tokens_BS, positions=None, segment_ids=None, *, method: str = "__call__"):
    """The pure forward that jitted steps call: params is the dict `split` returned."""
    return getattr(nnx.merge(graphdef, params), method)(tokens_BS, positions, segment_ids)


def loss_head(graphdef, params, dtype, rows: int):
    """The LM head for the loss, [R, D, V]: one copy per data-parallel replica R (`loss_batch`'s
    devices, when they divide the `rows` of the batch), its vocabulary split over every axis that
    shards the weights (`loss_vocab`). Resharded once per step, so the chunks of train.loss_sums
    gather no weights and reduce no [D, V] gradient across devices: each device's columns get their
    gradient whole from its own rows, summed over the replicas once, after the last chunk (with one
    shared [D, V] the partitioner all-reduces it over the data axis in every chunk)."""
    head_DV = nnx.merge(graphdef, params).head(dtype)
    R = mesh_size("loss_batch")
    R = R if rows % R == 0 else 1
    return constrain_dividing(jnp.broadcast_to(head_DV, (R, *head_DV.shape)), ("loss_batch", None, "loss_vocab"))


def apply_head(graphdef, params, x_BSD, head_RDV):
    """`loss_head`'s head applied to hidden states -> float32 logits [B, S, V], split like the head:
    rows r * B/R ... (r + 1) * B/R are replica r's."""
    (B, S, D), R = x_BSD.shape, head_RDV.shape[0]
    head_logits = nnx.merge(graphdef, params).head_logits
    on_mesh = _head_on_mesh(head_logits, x_BSD, head_RDV)
    if on_mesh is not None:
        return on_mesh
    x_RBSD = constrain(x_BSD.reshape(R, B // R, S, D), ("loss_batch", None, None, None))
    logits_RBSV = jax.vmap(head_logits)(x_RBSD, head_RDV)
    logits_RBSV = constrain_dividing(logits_RBSV, ("loss_batch", None, None, "loss_vocab"))
    return logits_RBSV.reshape(B, S, -1)


def _head_on_mesh(head_logits, x_BSD, head_RDV):
    """`apply_head` in `shard_map`, or None where the mesh gathers nothing (or splits the rows unevenly).

    Each device gathers its replica's hidden states for this chunk (all-gathers over the batch and
    sequence axes) and multiplies them by its own vocabulary columns; the gather's transpose hands
    each device its own rows' gradient, summed over the columns' devices. Left to the partitioner,
    the gather of the whole sequence was sunk into the chunk loop, so every chunk gathered all of it,
    and the gathered gradient came back in fp32 (SmolLM3-3B on v5p-16: 2.8 GiB per chip and step,
    now 0.94; docs/results/tpu-aot.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    (B, S, _), (R, _, V) = x_BSD.shape, head_RDV.shape

    rows, seq = mesh_axes("act_batch", mesh), mesh_axes("act_seq", mesh)
    replicas = mesh_axes("loss_batch", mesh) if R > 1 else ()
    vocab = dividing_axes(V, "loss_vocab", mesh)  # as `loss_head` placed the head
    gather_rows = tuple(a for a in rows if a not in replicas)
    if (
        not (gather_rows or seq)
        or B % math.prod(mesh.shape[a] for a in rows)
        or S % math.prod(mesh.shape[a] for a in seq)
    ):
        return None

    def per_device(x_bsD, head_1Dv):
        if gather_rows:
            x_bsD = jax.lax.all_gather(x_bsD, gather_rows, axis=0, tiled=True)
        if seq:
            x_bsD = jax.lax.all_gather(x_bsD, seq, axis=1, tiled=True)
        return head_logits(x_bsD, head_1Dv[0])[None]

    logits_RBSV = jax.shard_map(
        per_device,
        in_specs=(
            PartitionSpec(rows or None, seq or None, None),
            PartitionSpec(replicas or None, None, vocab or None),
        ),
        out_specs=PartitionSpec(replicas or None, None, None, vocab or None),
    )(x_BSD, head_RDV)
    return logits_RBSV.reshape(B, S, -1)
