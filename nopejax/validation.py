"""Validation: the one place that decides whether a config can run.

`validate()` rejects a config that cannot run, naming the field and the fix, before any array is
created or any function is compiled, so a typo costs a second, not a compile. One short function
per section; `check_platform()` adds what only the devices can tell. The schema and its defaults
are nopejax/config.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from nopejax import layers
from nopejax.config import (
    ATTENTION_IMPLS,
    BLOCKS,
    DATA_SOURCES,
    DTYPES,
    GDN_IMPLS,
    GDN_PALLAS_MAX_CHUNK,
    INIT_FROM_SCHEDULES,
    MAMBA_IMPLS,
    MAMBA_PALLAS_MAX_CHUNK,
    MLP_ACTIVATIONS,
    MOE_DISPATCHERS,
    NORMS,
    PALLAS_CONTEXT_BLOCK,
    REMAT_POLICIES,
    ROPE_SCALING_TYPES,
    ROUTERS,
    SCAN_PLANS,
    SCHEDULES,
    ConfigDict,
    ConfigError,
    context_chunk,
    schedule_lengths,
)
from nopejax.hf import registry

_log = logging.getLogger(__name__)
_said: set[str] = set()  # warnings already given in this process


def validate(cfg: ConfigDict) -> ConfigDict:
    """Reject configs that cannot run, naming the field and the fix. Returns `cfg`.

    One function per section, in this order; the first problem found is the one reported."""
    m = cfg.model
    _validate_model_sizes(m)
    _validate_rope_pattern(m)
    _validate_attention_kinds(m)
    _validate_ffn_types(m)
    _validate_recurrent_mixers(m)
    _validate_windows(m)
    _validate_rope_options(m)
    _validate_nope(m)
    _validate_moe(m, cfg.mesh)
    _validate_rope_frequencies(m)
    _validate_compute(m)
    _validate_block(m)
    _validate_mesh(cfg)
    _validate_train(cfg.train)
    _warn_windows(cfg)
    _validate_optim(cfg.optim, cfg.train.steps)
    _validate_data(cfg.data, cfg.train.global_batch_size)
    _validate_init_from(cfg)
    _validate_checkpoint(cfg.checkpoint)
    return cfg


def _positive(node: ConfigDict, section: str, names: Iterable[str]) -> None:
    for name in names:
        value = node[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{name}", f"must be a positive integer, got {value!r}", "set it above 0")


def _validate_model_sizes(m: ConfigDict) -> None:
    """Widths, depth and heads."""
    _positive(m, "model", ["vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff"])
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            "model.num_kv_heads",
            f"num_heads={m.num_heads} is not a multiple of num_kv_heads={m.num_kv_heads}",
            "choose num_kv_heads dividing num_heads (GQA shares each KV head across a group of query heads)",
        )
    if m.head_dim % 2:
        raise ConfigError("model.head_dim", f"RoPE needs an even head_dim, got {m.head_dim}", "use an even head_dim")
    # num_heads * head_dim may differ from d_model (Trinity Mini: 32 * 128 = 4096 over d_model 2048):
    # wq is [D, H, E] and wo [H, E, D], and HF configs carry head_dim explicitly


def _validate_rope_pattern(m: ConfigDict) -> None:
    """Which layers are NoPE: the explicit list or the interval."""
    if m.no_rope_layers is not None:
        if len(m.no_rope_layers) != m.num_layers:
            raise ConfigError(
                "model.no_rope_layers",
                f"has {len(m.no_rope_layers)} entries but num_layers = {m.num_layers}",
                "give exactly one 1 (RoPE) or 0 (NoPE) per layer",
            )
        if any(x not in (0, 1) for x in m.no_rope_layers):
            raise ConfigError(
                "model.no_rope_layers", f"entries must be 0 or 1, got {m.no_rope_layers}", "use 1 = RoPE, 0 = NoPE"
            )
    if not isinstance(m.no_rope_layer_interval, int) or m.no_rope_layer_interval < 0:
        raise ConfigError(
            "model.no_rope_layer_interval",
            f"must be an integer >= 0, got {m.no_rope_layer_interval!r}",
            "use 0 for no NoPE layers",
        )


def _validate_attention_kinds(m: ConfigDict) -> None:
    """Which layers are full, sliding or chunked: the explicit list or the periodic shorthand."""
    if not isinstance(m.global_attention_interval, int) or m.global_attention_interval < 0:
        raise ConfigError(
            "model.global_attention_interval", f"must be an integer >= 0, got {m.global_attention_interval!r}",
            "use e.g. 4 (every 4th layer global, the rest local) or 0 for off",
        )  # fmt: skip
    if m.layer_types is not None:
        if m.global_attention_interval:
            raise ConfigError(
                "model.global_attention_interval", "is set together with model.layer_types",
                "give either the explicit list or the periodic shorthand, not both",
            )  # fmt: skip
        if len(m.layer_types) != m.num_layers:
            raise ConfigError(
                "model.layer_types", f"has {len(m.layer_types)} entries but num_layers = {m.num_layers}",
                f"give exactly one of {layers.LAYER_TYPES} per layer",
            )  # fmt: skip
        bad = sorted({t for t in m.layer_types if t not in layers.LAYER_TYPES})
        if bad:
            raise ConfigError("model.layer_types", f"unknown layer type(s) {bad}", f"use {layers.LAYER_TYPES}")
    elif m.global_attention_interval and m.sliding_window is not None and m.attention_chunk_size is not None:
        raise ConfigError(
            "model.global_attention_interval", "both sliding_window and attention_chunk_size are set, so "
            "the local layers of the shorthand are ambiguous", "unset one, or list model.layer_types explicitly",
        )  # fmt: skip


def _validate_ffn_types(m: ConfigDict) -> None:
    """The dense FFN's activation, the explicit FFN per layer, and layers that would hold nothing."""
    if m.mlp_activation not in MLP_ACTIVATIONS:
        raise ConfigError("model.mlp_activation", f"is {m.mlp_activation!r}", f"use one of {list(MLP_ACTIVATIONS)}")
    if m.mlp_activation == "relu2" and m.num_experts:
        raise ConfigError(
            "model.mlp_activation", "is 'relu2', but nopejax's routed and shared experts are SwiGLU only",
            "use mlp_activation='swiglu' with num_experts > 0, or a dense model (num_experts=0)",
        )  # fmt: skip
    if m.ffn_types is not None:
        if len(m.ffn_types) != m.num_layers:
            raise ConfigError(
                "model.ffn_types", f"has {len(m.ffn_types)} entries but num_layers = {m.num_layers}",
                f"give exactly one of {layers.FFNS} per layer",
            )  # fmt: skip
        bad = sorted({t for t in m.ffn_types if t not in layers.FFNS})
        if bad:
            raise ConfigError("model.ffn_types", f"unknown FFN kind(s) {bad}", f"use {layers.FFNS}")
        if ("moe" in m.ffn_types) != bool(m.num_experts):
            raise ConfigError(
                "model.ffn_types", f"lists {'an' if 'moe' in m.ffn_types else 'no'} MoE layer but num_experts = "
                f"{m.num_experts}", "give the model experts for its moe layers, or list no moe layer without them",
            )  # fmt: skip
        if m.num_dense_layers or m.moe_layer_interval != 1:
            raise ConfigError(
                "model.ffn_types", "is set together with num_dense_layers / moe_layer_interval",
                "give either the explicit list or those fields, not both",
            )  # fmt: skip
    for i, spec in enumerate(layers.layer_specs(m)):
        if spec.mixer == "none" and spec.ffn == "none":
            raise ConfigError(
                "model.ffn_types", f"layer {i} has no mixer (layer type mlp) and no FFN", "give it an FFN or a mixer"
            )
        if spec.block == "parallel" and (spec.mixer != "attention" or spec.ffn == "none"):
            raise ConfigError(
                "model.block", f"parallel blocks read one norm into attention and an FFN, but layer {i} has "
                f"mixer {spec.mixer} and FFN {spec.ffn}", "use block=pre_norm, or attention and an FFN in every layer",
            )  # fmt: skip


def _validate_recurrent_mixers(m: ConfigDict) -> None:
    """Mamba2 and Gated DeltaNet sizes; positions on their layers."""
    types = layers.layer_types(m)
    if m.no_rope_layers is not None:
        for i, (kind, rope) in enumerate(zip(types, m.no_rope_layers)):
            if rope and kind not in layers.ATTENTION_TYPES:
                raise ConfigError(
                    "model.no_rope_layers", f"layer {i} is a {kind} layer, which has no attention to rotate, "
                    "but its entry is 1 (RoPE)", f"set entry {i} to 0",
                )  # fmt: skip
    for kind, heads, sizes in (
        ("mamba2", "mamba_num_heads", ["mamba_head_dim", "mamba_groups", "mamba_state_size", "mamba_conv_kernel",
                                       "mamba_chunk_size"]),
        ("gated_deltanet", "gdn_key_heads", ["gdn_value_heads", "gdn_key_head_dim", "gdn_value_head_dim",
                                             "gdn_conv_kernel", "gdn_chunk_size"]),
    ):  # fmt: skip
        if kind not in types and m[heads]:
            raise ConfigError(
                f"model.{heads}", f"is {m[heads]} but no layer is {kind}",
                f"set it to 0, or make some layers {kind} (model.layer_types)",
            )  # fmt: skip
        if kind in types:
            _positive(m, "model", [heads, *sizes])
    if "mamba2" in types:
        _validate_mamba_sizes(m)
    if "gated_deltanet" in types and m.gdn_value_heads % m.gdn_key_heads:
        raise ConfigError(
            "model.gdn_value_heads", f"{m.gdn_value_heads} is not a multiple of gdn_key_heads={m.gdn_key_heads} "
            "(each key head serves an equal group of value heads)", "choose value heads a multiple of key heads",
        )  # fmt: skip
    if "gated_deltanet" in types and m.gdn_norm_eps is not None and not m.gdn_norm_eps > 0:
        raise ConfigError("model.gdn_norm_eps", f"must be positive, got {m.gdn_norm_eps}", "use e.g. 1e-5, or unset")
    if "gated_deltanet" in types and m.gdn_impl == "pallas" and m.gdn_chunk_size > GDN_PALLAS_MAX_CHUNK:
        raise ConfigError(
            "model.gdn_chunk_size", f"{m.gdn_chunk_size} is too long for the Pallas Gated DeltaNet kernels (their "
            f"[c, c] tiles must fit in VMEM: at most {GDN_PALLAS_MAX_CHUNK})",
            f"use gdn_chunk_size <= {GDN_PALLAS_MAX_CHUNK}, or model.gdn_impl=xla",
        )  # fmt: skip


def _validate_mamba_sizes(m: ConfigDict) -> None:
    if m.mamba_num_heads % m.mamba_groups:
        raise ConfigError(
            "model.mamba_groups", f"mamba_num_heads={m.mamba_num_heads} is not a multiple of mamba_groups="
            f"{m.mamba_groups} (B and C are shared by equal groups of heads)", "choose groups dividing the heads",
        )  # fmt: skip
    limit = m.mamba_time_step_limit
    if limit is not None and not (len(limit) == 2 and 0 <= limit[0] <= limit[1]):
        raise ConfigError(
            "model.mamba_time_step_limit", f"must be (min, max) with 0 <= min <= max, got {limit!r}",
            "use e.g. (0.0, 100.0), or leave it unset for no clamp",
        )  # fmt: skip
    if m.mamba_impl == "pallas" and m.mamba_chunk_size > MAMBA_PALLAS_MAX_CHUNK:
        raise ConfigError(
            "model.mamba_chunk_size", f"{m.mamba_chunk_size} is too long for the Pallas SSD kernel (its [c, c] "
            f"tiles must fit in VMEM: at most {MAMBA_PALLAS_MAX_CHUNK})",
            f"use mamba_chunk_size <= {MAMBA_PALLAS_MAX_CHUNK}, or model.mamba_impl=xla",
        )  # fmt: skip


def _validate_windows(m: ConfigDict) -> None:
    """A size for every local kind in use, and none for a kind that is not."""
    for field in ("sliding_window", "attention_chunk_size"):
        value = m[field]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"model.{field}", f"must be a positive integer, got {value!r}", "use e.g. 4096")
    types = layers.layer_types(m)
    for field, kind in (("sliding_window", "sliding_attention"), ("attention_chunk_size", "chunked_attention")):
        if kind in types and m[field] is None:
            raise ConfigError(
                f"model.{field}", f"layer {types.index(kind)} is {kind} but no size is set",
                f"set model.{field}, or make that layer full_attention",
            )  # fmt: skip
        if kind not in types and m[field] is not None:
            raise ConfigError(
                f"model.{field}", f"is {m[field]} but no layer is {kind}",
                "unset it, or add such layers (model.layer_types or model.global_attention_interval)",
            )  # fmt: skip


def _validate_rope_options(m: ConfigDict) -> None:
    """How RoPE layers rotate, and the QK-norm."""
    f = m.partial_rotary_factor
    if not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ConfigError("model.partial_rotary_factor", f"must be in (0, 1], got {f!r}", "use e.g. 0.5, or 1.0")
    rotated = int(m.head_dim * f)
    if rotated < 2 or rotated % 2:
        raise ConfigError(
            "model.partial_rotary_factor", f"rotates int({f} * head_dim {m.head_dim}) = {rotated} dims, "
            "RoPE needs an even number >= 2", "choose a factor giving an even rotated width",
        )  # fmt: skip
    if m.rope_layout not in layers.ROPE_LAYOUTS:
        raise ConfigError("model.rope_layout", f"unknown layout {m.rope_layout!r}", f"use one of {layers.ROPE_LAYOUTS}")
    if m.qk_norm not in layers.QK_NORMS:
        raise ConfigError("model.qk_norm", f"unknown value {m.qk_norm!r}", f"use one of {layers.QK_NORMS}")
    if m.rope_theta_local is not None and not m.rope_theta_local > 0:
        raise ConfigError("model.rope_theta_local", f"must be positive, got {m.rope_theta_local}", "use e.g. 10000.0")


def _validate_nope(m: ConfigDict) -> None:
    """Options that shape one kind of layer are refused when no layer of that kind exists."""
    pattern, types = layers.rope_pattern(m), layers.layer_types(m)
    if not any(pattern):  # every layer NoPE: options that only shape RoPE layers are contradictions
        used = {"partial_rotary_factor": m.partial_rotary_factor != 1.0, "rope_layout": m.rope_layout != "half",
                "qk_norm": m.qk_norm == "l2"}  # fmt: skip
        unused = [name for name, is_set in used.items() if is_set]
        if unused:
            raise ConfigError(
                f"model.{unused[0]}", f"is {m[unused[0]]!r} but every layer is NoPE, so no layer would use it",
                "remove it, or give some layers RoPE",
            )  # fmt: skip
    if m.rope_theta_local is not None and not any(p and t != "full_attention" for p, t in zip(pattern, types)):
        raise ConfigError(
            "model.rope_theta_local", "is set but no local (sliding/chunked) layer uses RoPE",
            "unset it, or give the local layers RoPE",
        )  # fmt: skip
    t = m.nope_temperature
    if t is not None:
        if len(t) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in t):
            raise ConfigError(
                "model.nope_temperature", f"must be two positive numbers (floor_scale, attn_scale), got {t!r}",
                "use e.g. (8192, 0.1) as Llama 4, or leave it unset",
            )  # fmt: skip
        if all(pattern):
            raise ConfigError(
                "model.nope_temperature", "is set but there is no NoPE layer (it scales NoPE queries only)",
                "unset it, or add NoPE layers (no_rope_layer_interval / no_rope_layers)",
            )  # fmt: skip


def _validate_moe(m: ConfigDict, mesh: ConfigDict) -> None:
    """Mixture-of-experts fields; with num_experts = 0 the others must stay at their defaults."""
    if not isinstance(m.num_experts, int) or isinstance(m.num_experts, bool) or m.num_experts < 0:
        raise ConfigError("model.num_experts", f"must be an integer >= 0, got {m.num_experts!r}", "use 0 or e.g. 8")
    if not isinstance(m.shared_expert_gate, bool):
        raise ConfigError("model.shared_expert_gate", f"must be True or False, got {m.shared_expert_gate!r}",
                          "use a bool")  # fmt: skip
    if m.shared_expert_gate and not (m.num_experts and m.num_shared_experts):
        raise ConfigError(
            "model.shared_expert_gate", f"gates the shared experts' output, but the model has none (num_experts = "
            f"{m.num_experts}, num_shared_experts = {m.num_shared_experts})",
            "set shared_expert_gate = False, or give the MoE layers a shared expert",
        )  # fmt: skip
    if not m.num_experts:
        if mesh.expert != 1:
            raise ConfigError(
                "mesh.expert", f"is {mesh.expert} but the model has no experts (model.num_experts = 0)",
                "set mesh.expert = 1, or give the model experts",
            )  # fmt: skip
        return
    _validate_moe_layers(m)
    _validate_router(m)
    if not isinstance(mesh.expert, int) or mesh.expert < 1 or m.num_experts % mesh.expert:
        raise ConfigError(
            "mesh.expert", f"{mesh.expert!r} does not divide num_experts = {m.num_experts}",
            "choose an expert-parallel size dividing the number of experts",
        )  # fmt: skip


def _validate_moe_layers(m: ConfigDict) -> None:
    """Expert counts and widths, and which layers are MoE."""
    E, k = m.num_experts, m.experts_per_token
    for name in ("experts_per_token", "moe_layer_interval"):
        if not isinstance(m[name], int) or isinstance(m[name], bool) or m[name] < 1:
            raise ConfigError(f"model.{name}", f"must be a positive integer, got {m[name]!r}", "set it to 1 or more")
    if k > E:
        raise ConfigError(
            "model.experts_per_token", f"top-{k} routing needs at least {k} experts, num_experts = {E}",
            "lower experts_per_token or add experts",
        )  # fmt: skip
    for name in ("expert_d_ff", "num_shared_experts", "num_dense_layers"):
        if not isinstance(m[name], int) or isinstance(m[name], bool) or m[name] < 0:
            raise ConfigError(f"model.{name}", f"must be an integer >= 0, got {m[name]!r}", "use 0 or a positive count")
    if "moe" not in layers.ffn_pattern(m):
        raise ConfigError(
            "model.num_dense_layers", f"no layer is MoE (num_dense_layers = {m.num_dense_layers}, "
            f"moe_layer_interval = {m.moe_layer_interval}, num_layers = {m.num_layers})",
            "lower num_dense_layers / moe_layer_interval, or set num_experts = 0 for a dense model",
        )  # fmt: skip


def _validate_router(m: ConfigDict) -> None:
    """Routing, dispatch, capacity and the balancing losses."""
    if m.router not in ROUTERS:
        raise ConfigError("model.router", f"unknown router {m.router!r}", f"use one of {ROUTERS}")
    if not m.routed_scale > 0:
        raise ConfigError("model.routed_scale", f"must be positive, got {m.routed_scale}", "use 1.0 for no scaling")
    if m.router_scale_input and (m.router_normalize or m.routed_scale != 1.0):
        raise ConfigError(
            "model.router_scale_input", "scales expert inputs by the raw router weights (Llama 4), so "
            "router_normalize / routed_scale would be ignored", "unset router_normalize and routed_scale",
        )  # fmt: skip
    if m.moe_dispatch not in MOE_DISPATCHERS:
        raise ConfigError(
            "model.moe_dispatch", f"unknown token dispatcher {m.moe_dispatch!r}",
            f"use one of {MOE_DISPATCHERS} (they compute the same; see README, Mixture of experts)",
        )  # fmt: skip
    if not (isinstance(m.moe_dispatch_chunks, int) and m.moe_dispatch_chunks >= 1):
        raise ConfigError("model.moe_dispatch_chunks", f"must be an integer >= 1, got {m.moe_dispatch_chunks!r}",
                          "use 1 (all tokens at once) or e.g. the expert-axis size")  # fmt: skip
    if m.moe_dispatch_chunks > 1 and m.moe_dispatch != "allgather":
        raise ConfigError(
            "model.moe_dispatch_chunks", f"splits the allgather dispatcher's tokens, but moe_dispatch is "
            f"{m.moe_dispatch!r}", "set moe_dispatch=allgather, or moe_dispatch_chunks=1",
        )  # fmt: skip
    if m.capacity_factor != 0 and not m.capacity_factor > 0:
        raise ConfigError("model.capacity_factor", f"must be >= 0, got {m.capacity_factor}", "use 0 or e.g. 1.25")
    for name in ("balance_loss_weight", "router_z_loss_weight", "expert_bias_rate"):
        if not m[name] >= 0:
            raise ConfigError(f"model.{name}", f"must be >= 0, got {m[name]!r}", "use 0 to turn it off")


def _validate_rope_frequencies(m: ConfigDict) -> None:
    """The RoPE base and HF-style `rope_scaling`."""
    if not m.rope_theta > 0:
        raise ConfigError("model.rope_theta", f"must be positive, got {m.rope_theta}", "use e.g. 10000.0")
    if m.rope_scaling is None:
        return
    kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(
            "model.rope_scaling", f"rope_type {kind!r} is not supported", f"use one of {list(ROPE_SCALING_TYPES)}"
        )
    required, optional = ROPE_SCALING_TYPES[kind]
    given = set(m.rope_scaling) - {"rope_type", "type"}
    if required - given or given - required - optional:
        raise ConfigError(
            "model.rope_scaling", f"{kind} scaling got keys {sorted(given)}",
            f"give {sorted(required)}" + (f" and optionally {sorted(optional)}" if optional else ""),
        )  # fmt: skip
    if not float(m.rope_scaling["factor"]) >= 1.0:
        raise ConfigError("model.rope_scaling", "needs a `factor` >= 1", "add factor, e.g. 4.0")
    if kind == "llama3" and not m.rope_scaling["high_freq_factor"] >= m.rope_scaling["low_freq_factor"]:
        raise ConfigError(
            "model.rope_scaling", "llama3 needs high_freq_factor >= low_freq_factor",
            "use e.g. low_freq_factor=1.0, high_freq_factor=4.0 (Llama 3.1)",
        )  # fmt: skip


def _validate_compute(m: ConfigDict) -> None:
    """Dtypes, the attention implementation, remat and the norm epsilon."""
    for field in ("dtype", "param_dtype"):
        if m[field] not in DTYPES:
            raise ConfigError(f"model.{field}", f"unknown dtype {m[field]!r}", f"use one of {DTYPES}")
    if m.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(
            "model.attention_impl", f"unknown value {m.attention_impl!r}", f"use one of {ATTENTION_IMPLS}"
        )
    if m.attention_impl == "pallas" and m.head_dim not in (64, 128, 256):
        raise ConfigError(
            "model.attention_impl", f"the Pallas kernel supports head_dim 64, 128 or 256, not {m.head_dim}",
            "use attention_impl=xla (or auto), or a supported head_dim",
        )  # fmt: skip
    if m.mamba_impl not in MAMBA_IMPLS:
        raise ConfigError("model.mamba_impl", f"unknown value {m.mamba_impl!r}", f"use one of {MAMBA_IMPLS}")
    if m.gdn_impl not in GDN_IMPLS:
        raise ConfigError("model.gdn_impl", f"unknown value {m.gdn_impl!r}", f"use one of {GDN_IMPLS}")
    if m.remat not in REMAT_POLICIES:
        raise ConfigError("model.remat", f"unknown policy {m.remat!r}", f"use one of {REMAT_POLICIES}")
    if m.scan_plan not in SCAN_PLANS:
        raise ConfigError("model.scan_plan", f"unknown plan {m.scan_plan!r}", f"use one of {SCAN_PLANS}")
    if m.scan_plan == "switch" and m.remat != "full":
        raise ConfigError(
            "model.scan_plan", "'switch' with model.remat " + repr(m.remat) + " would keep every branch's "
            "activations for each layer", "set model.remat='full', or model.scan_plan='period' or 'auto'",
        )  # fmt: skip
    if not isinstance(m.shared_rope_body, bool):
        raise ConfigError("model.shared_rope_body", f"must be a bool, got {m.shared_rope_body!r}", "use True or False")
    if not m.rms_norm_eps > 0:
        raise ConfigError("model.rms_norm_eps", f"must be positive, got {m.rms_norm_eps}", "use e.g. 1e-6")


def _validate_block(m: ConfigDict) -> None:
    """Norm kind, block form, output scale and export family (one of nopejax/hf/registry.py's)."""
    for field, allowed in (("norm", NORMS), ("block", BLOCKS), ("hf_family", registry.NAMES)):
        if m[field] not in allowed:
            raise ConfigError(f"model.{field}", f"unknown value {m[field]!r}", f"use one of {allowed}")
    if m.recurrent_block is not None:
        forms = tuple(b for b in BLOCKS if b != "parallel")  # parallel reads one norm into attention and an FFN
        if m.recurrent_block not in forms:
            raise ConfigError("model.recurrent_block", f"unknown value {m.recurrent_block!r}",
                              f"use one of {forms}, or unset it (= model.block)")  # fmt: skip
        if not any(t in layers.RECURRENT_MIXERS for t in layers.layer_types(m)):
            raise ConfigError(
                "model.recurrent_block", f"is {m.recurrent_block!r} but no layer has a recurrent mixer",
                "unset it, or make some layers mamba2 / gated_deltanet (model.layer_types)",
            )  # fmt: skip
    scale = m.logit_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ConfigError(
            "model.logit_scale", f"must be a positive finite number, got {scale!r}",
            "use 1.0 (no scaling) or the model's value, e.g. 0.0625 (Command R)",
        )  # fmt: skip
    scale = m.embed_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ConfigError(
            "model.embed_scale", f"must be a positive finite number, got {scale!r}",
            "use 1.0 (no scaling) or sqrt(d_model) (AFMoE's muP input scale)",
        )  # fmt: skip
    for name in ("residual_scale", "attention_scale"):
        scale = m[name]
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale < float("inf")):  # fmt: skip
            raise ConfigError(f"model.{name}", f"must be a positive finite number, got {scale!r}", "use e.g. 1.0")
    for name in ("attention_gate", "norm_unit_offset"):
        if not isinstance(m[name], bool):
            raise ConfigError(f"model.{name}", f"must be True or False, got {m[name]!r}", "use a bool")
    if m.norm_unit_offset and m.norm != "rms":
        raise ConfigError(
            "model.norm_unit_offset", f"scales RMSNorms by 1 + w, but model.norm is {m.norm!r}",
            "use norm = 'rms', or norm_unit_offset = False",
        )  # fmt: skip


def _validate_mesh(cfg: ConfigDict) -> None:
    """Axis sizes, context parallelism (`_validate_context`), and the tensor axis against the KV heads."""
    mesh = cfg.mesh
    for axis in ("data", "fsdp", "context", "tensor", "dcn_data", "dcn_fsdp", "dcn_context"):
        v = mesh[axis]
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"mesh.{axis}", f"must be a positive integer or -1, got {v!r}", "use -1 for 'the rest'")
    if [mesh.data, mesh.fsdp, mesh.context, mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh", "more than one axis is -1", "let at most one of data/fsdp/tensor be -1")
    _validate_context(cfg)
    if mesh.tensor > 0 and cfg.model.num_kv_heads % mesh.tensor:
        raise ConfigError(
            "mesh.tensor",
            f"num_kv_heads={cfg.model.num_kv_heads} is not divisible by the tensor axis size {mesh.tensor}",
            "make mesh.tensor divide model.num_kv_heads",
        )


def _validate_context(cfg: ConfigDict) -> None:
    """Context parallelism: zig-zag needs two equal chunks of every row per context device, and the
    batch still fills the data-parallel axes (context devices share rows, they do not add any)."""
    mesh, t = cfg.mesh, cfg.train
    for axis in ("context", "dcn_context"):  # its size fixes the zig-zag chunks, so it is never "the rest"
        if mesh[axis] == -1:
            raise ConfigError(f"mesh.{axis}", "cannot be -1", "give its size; let mesh.data or mesh.fsdp be -1")
    C = mesh.context * mesh.dcn_context
    if C > 1 and t.seq_len % (2 * C):
        raise ConfigError(
            "train.seq_len", f"{t.seq_len} is not divisible by 2 x context = {2 * C} (zig-zag load balancing "
            "gives each context device two equal chunks of every row)",
            f"use a seq_len that is a multiple of {2 * C}, or change mesh.context",
        )  # fmt: skip
    chunk = context_chunk(cfg)
    if cfg.model.attention_impl == "pallas" and chunk is not None and chunk % PALLAS_CONTEXT_BLOCK:
        raise ConfigError(
            "train.seq_len", f"the Pallas kernel under context parallelism needs zig-zag chunks of a multiple of "
            f"{PALLAS_CONTEXT_BLOCK} rows, but seq_len {t.seq_len} / (2 x context {C}) = {chunk}",
            f"use a seq_len that is a multiple of {2 * C * PALLAS_CONTEXT_BLOCK}, a smaller mesh.context, or "
            "model.attention_impl=auto (which then takes XLA attention)",
        )  # fmt: skip
    for kind, kernel in (("mamba2", "mamba_conv_kernel"), ("gated_deltanet", "gdn_conv_kernel")):
        W = cfg.model[kernel] - 1  # the conv inputs a chunk reads from its neighbour
        if kind in layers.layer_types(cfg.model) and chunk is not None and chunk < W:
            raise ConfigError(
                "train.seq_len", f"a {kind} conv under context parallelism reads the {W} inputs before each "
                f"zig-zag chunk from one neighbour, but seq_len {t.seq_len} / (2 x context {C}) = {chunk} rows",
                f"use a seq_len of at least {2 * C * W}, or a smaller mesh.context",
            )  # fmt: skip
    rows = t.global_batch_size // t.grad_accum
    data_parallel = [mesh[a] * mesh[f"dcn_{a}"] for a in ("data", "fsdp") if mesh[a] != -1]
    if C > 1 and rows % max(1, math.prod(data_parallel)):
        raise ConfigError(
            "train.global_batch_size", f"each microbatch has {rows} rows, not divisible by data x fsdp = "
            f"{math.prod(data_parallel)} (context devices split the sequence, not the batch)",
            "raise the global batch, or move devices from data/fsdp to mesh.context",
        )  # fmt: skip


def _validate_train(t: ConfigDict) -> None:
    """Steps, batch, sequence length, logging and the loss options."""
    _positive(t, "train", ["steps", "global_batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"])
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(
            "train.grad_accum",
            f"global_batch_size={t.global_batch_size} is not divisible by grad_accum={t.grad_accum}",
            "choose grad_accum dividing the global batch",
        )
    if t.eval_every < 0:
        raise ConfigError("train.eval_every", "must be >= 0", "use 0 to turn evaluation off")
    if not isinstance(t.sample_every, int) or t.sample_every < 0:
        raise ConfigError("train.sample_every", f"must be an integer >= 0, got {t.sample_every!r}", "use 0 for off")
    if t.loss_chunk_len < 0 or (t.loss_chunk_len and t.seq_len % t.loss_chunk_len):
        raise ConfigError(
            "train.loss_chunk_len", f"{t.loss_chunk_len} does not divide seq_len={t.seq_len}",
            "use 0 (no chunking) or a divisor of train.seq_len",
        )  # fmt: skip
    if t.z_loss < 0:
        raise ConfigError("train.z_loss", "must be >= 0", "use e.g. 1e-4, or 0 to turn it off")
    _positive(t, "train", ["max_nonfinite_steps", "stop_grace_seconds"])


def _warn_windows(cfg: ConfigDict) -> None:
    """A window or chunk that covers the whole training row makes its layers global while training.
    Legal (the window still limits attention at longer lengths, e.g. in eval-length), so a warning."""
    m, S = cfg.model, cfg.train.seq_len
    for field, kind in (("sliding_window", "sliding_attention"), ("attention_chunk_size", "chunked_attention")):
        if m[field] is not None and m[field] >= S and kind in layers.layer_types(m):
            message = (
                f"model.{field} = {m[field]} >= train.seq_len = {S}: the {kind} layers see the whole row, so they "
                f"train as global attention; use a {field} below {S} for local layers"
            )
            if message not in _said:
                _said.add(message)
                _log.warning(message)


def _validate_optim(o: ConfigDict, steps: int) -> None:
    """Learning rate, schedule lengths against train.steps, betas, clipping and decay."""
    if not o.lr > 0:
        raise ConfigError("optim.lr", f"must be positive, got {o.lr}", "use e.g. 3e-4")
    if o.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", f"unknown schedule {o.schedule!r}", f"use one of {SCHEDULES}")
    for name in ("warmup_steps", "decay_steps"):
        v = o[name]
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or (v >= 1 and v != int(v)):
            raise ConfigError(
                f"optim.{name}", f"must be a fraction of train.steps below 1 or a whole number of steps, got {v!r}",
                "use e.g. 0.1 (10% of the run) or 100 (steps); 0 for none",
            )  # fmt: skip
    warmup, decay = schedule_lengths(o, steps)
    if o.schedule == "wsd" and warmup + decay > steps:
        fractions = [f"{n} = {o[n]} of {steps} steps" for n in ("warmup_steps", "decay_steps") if o[n] < 1]
        raise ConfigError(
            "optim.decay_steps",
            f"warmup_steps + decay_steps = {warmup} + {decay} = {warmup + decay} exceeds train.steps = {steps}"
            + (f" ({'; '.join(fractions)})" if fractions else ""),
            "give them as fractions of the run (e.g. 0.1 and 0.2), shorten them, or train longer",
        )
    if not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1:
        raise ConfigError("optim.b1", f"betas must be in [0, 1), got b1={o.b1}, b2={o.b2}", "use e.g. 0.9 and 0.95")
    if o.clip_norm < 0 or o.weight_decay < 0:
        raise ConfigError("optim.clip_norm", "clip_norm and weight_decay must be >= 0", "use 0 to turn either off")


def _validate_data(d: ConfigDict, global_batch_size: int) -> None:
    """Source and path, text handling, packing, shards, the eval split and the synthetic tasks."""
    if d.source not in DATA_SOURCES:
        raise ConfigError("data.source", f"unknown source {d.source!r}", f"use one of {DATA_SOURCES}")
    if d.source in ("text", "jsonl", "parquet", "arrayrecord", "prepared") and not d.path:
        raise ConfigError("data.path", f"data.source={d.source!r} needs a path", "set --config.data.path=GLOB")
    if d.text_unit not in ("file", "block"):
        raise ConfigError("data.text_unit", f"unknown value {d.text_unit!r}", "use 'file' or 'block'")
    if d.packing not in ("concat", "pad"):
        raise ConfigError("data.packing", f"unknown value {d.packing!r}", "use 'concat' or 'pad'")
    if not isinstance(d.num_shards, int) or d.num_shards < 0 or (d.num_shards and global_batch_size % d.num_shards):
        raise ConfigError(
            "data.num_shards", f"{d.num_shards!r} must be 0 or a divisor of the global batch {global_batch_size}",
            "use 0 (one shard per row of the global batch, the default) or a divisor of the global batch",
        )  # fmt: skip
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}", "use e.g. 0.02")
    if d.task_train_min_len > d.task_train_max_len or d.task_test_min_len > d.task_test_max_len:
        raise ConfigError("data.task_train_min_len", "a min length exceeds its max length", "order the bounds")
    if not isinstance(d.task_packed, bool):
        raise ConfigError("data.task_packed", f"must be True or False, got {d.task_packed!r}", "use True or False")


def _validate_init_from(cfg: ConfigDict) -> None:
    """What a run started from another carries over."""
    if cfg.init_from_schedule not in INIT_FROM_SCHEDULES:
        raise ConfigError(
            "init_from_schedule", f"unknown value {cfg.init_from_schedule!r}",
            f"use one of {INIT_FROM_SCHEDULES} (reset: step 0 and a new warmup; continue: the source's step)",
        )  # fmt: skip
    if not cfg.init_from and (cfg.init_from_optimizer or cfg.init_from_schedule != "reset"):
        field = "init_from_optimizer" if cfg.init_from_optimizer else "init_from_schedule"
        raise ConfigError(field, "is set but init_from is empty", "set init_from to the run to continue from")


def _validate_checkpoint(c: ConfigDict) -> None:
    if c.every_steps < 0 or c.keep < 1 or c.keep_period < 0:
        raise ConfigError("checkpoint.keep", "every_steps and keep_period must be >= 0, keep >= 1", "fix the values")


def check_platform(cfg: ConfigDict, platform: str) -> None:
    """What `validate` cannot know: whether the attention path and the Mamba2 and Gated DeltaNet kernel
    paths run on these devices ("cpu", "gpu" or "tpu"). `auto` attention always picks one that does
    (nopejax.attention.resolve_impl)."""
    if cfg.model.moe_dispatch == "ragged" and cfg.model.num_experts and cfg.mesh.expert != 1 and platform == "cpu":
        raise ConfigError(
            "model.moe_dispatch", "ragged needs jax.lax.ragged_all_to_all, which XLA:CPU does not have",
            "use allgather or all_to_all on CPU (they compute the same), ragged on TPU or GPU",
        )  # fmt: skip
    if cfg.model.mamba_impl == "pallas" and platform not in ("tpu", "cpu"):
        raise ConfigError(
            "model.mamba_impl", f"the Pallas SSD kernel is a Mosaic TPU kernel, these devices are {platform}",
            "use mamba_impl=xla (or a TPU; CPU runs the kernel in Pallas's interpreter, for tests)",
        )  # fmt: skip
    if cfg.model.gdn_impl == "pallas" and platform not in ("tpu", "cpu"):
        raise ConfigError(
            "model.gdn_impl", f"the Pallas Gated DeltaNet kernels are Mosaic TPU kernels, these devices are {platform}",
            "use gdn_impl=xla (or a TPU; CPU runs the kernels in Pallas's interpreter, for tests)",
        )  # fmt: skip
    impl = cfg.model.attention_impl
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError("model.attention_impl", f"cudnn needs a GPU, these devices are {platform}", "use auto or xla")
    if impl == "pallas" and platform == "gpu" and context_chunk(cfg) is not None:
        raise ConfigError(
            "model.attention_impl", "the Pallas kernel runs context parallelism (suffix queries) on TPU only, "
            f"these devices are {platform}", "use auto or xla (XLA attention per device), or set mesh.context=1",
        )  # fmt: skip
