"""Run configuration: the schema with its defaults, loading config files and overrides.

Every config file under `configs/` starts from `base_config()` and changes fields; a key the
schema lacks is refused where it is set. Whether a config can run is nopejax/validation.py
(`validate()`, before any array is created or any function is compiled). What each layer is,
read from these fields, is nopejax/layers.py.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict

# The layer-spec names under nopejax.config as well, kept for one release for code that imports
# them from here; nopejax.layers is their home.
from nopejax.layers import (  # noqa: F401
    FFNS,
    LAYER_TYPES,
    MIXERS,
    QK_NORMS,
    ROPE_LAYOUTS,
    LayerSpec,
    block_structure,
    ffn_pattern,
    layer_specs,
    layer_types,
    rope_pattern,
)

ConfigDict = ml_collections.ConfigDict

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
MAMBA_IMPLS = ("xla", "pallas")
# the Mamba2 Pallas kernels keep several [c, c] fp32 tiles in VMEM: chunks of 1024 overflow a v5p
# core's scoped VMEM at compile time (512 compiles; measured with Mosaic ahead of time)
MAMBA_PALLAS_MAX_CHUNK = 512
GDN_IMPLS = ("xla", "pallas")
# the Gated DeltaNet UT-transform kernel keeps A, its inverse and the merge products ([c, c] fp32) in
# VMEM: its backward at chunks of 512 overflows a v5p core's 16 MiB scoped VMEM (256 compiles; Mosaic
# ahead of time)
GDN_PALLAS_MAX_CHUNK = 256
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
SCAN_PLANS = ("auto", "period", "switch")
SCHEDULES = ("wsd", "cosine", "linear", "constant")
INIT_FROM_SCHEDULES = ("reset", "continue")
HISTORY_KEY = "history"  # DIR/config.json's record of the run's stages; not a config field
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = (
    "default", "text", "jsonl", "parquet", "arrayrecord", "prepared", "copy", "reverse", "parity", "passkey",
)  # fmt: skip
# rope_scaling type -> (required keys, optional keys) besides `rope_type` / `type`, as HF validates them
ROPE_SCALING_TYPES = {
    "linear": ({"factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}  # fmt: skip
MLP_ACTIVATIONS = ("swiglu", "relu2")  # model.mlp_activation
NORMS = ("rms", "layernorm")
BLOCKS = ("pre_norm", "parallel", "post_norm", "sandwich")  # model.BLOCK_NORMS: the norm weights of each
ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("allgather", "all_to_all", "ragged")  # nopejax/moe.py: token dispatch over the expert axis
# Under context parallelism the Pallas kernel takes each zig-zag chunk as suffix queries, on its TPU
# form only (nopejax/kernels/flash.py), in blocks of 128 rows: chunks must be multiples of it.
PALLAS_CONTEXT_BLOCK = 128


class ConfigError(ValueError):
    """A config that cannot run. The message names the field, the problem and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"config field `{field}`: {problem}. Fix: {fix}.")


class RunError(RuntimeError):
    """A run that cannot go on (a save that failed, a loss that stays non-finite): one line
    naming what happened and what to do, printed without a traceback."""


def base_config() -> ConfigDict:
    """All fields with defaults. Config files override; they never add new keys."""
    cfg = ConfigDict()

    cfg.model = m = ConfigDict()
    m.vocab_size = 384
    m.d_model = 192
    m.num_layers = 6
    m.num_heads = 6
    m.num_kv_heads = 2
    m.head_dim = 32
    m.d_ff = 512
    # SmolLM3 semantics: layer i is NoPE when (i + 1) % interval == 0; 0 disables NoPE.
    m.no_rope_layer_interval = 4
    # Explicit per-layer list (1 = RoPE, 0 = NoPE); when set it overrides the interval.
    m.no_rope_layers = config_dict.placeholder(tuple)
    m.rope_theta = 10000.0
    # HF `rope_scaling` semantics, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 128}. Applied to RoPE layers only.
    m.rope_scaling = config_dict.placeholder(dict)
    # Mixer per layer: an attention kind (HF `layer_types` names: full_attention, sliding_attention,
    # chunked_attention), "mamba2" (the mamba_* fields), "gated_deltanet" (the gdn_* fields) or
    # "mlp" (no mixer: an FFN-only layer); unset = every layer full attention.
    m.layer_types = config_dict.placeholder(tuple)
    # FFN per layer: "dense", "moe" or "none" (a mixer-only layer, Nemotron-H); unset = the MoE
    # fields below decide (dense everywhere without experts).
    m.ffn_types = config_dict.placeholder(tuple)
    # Periodic shorthand (HF `sliding_window_pattern`): layer i is full when (i + 1) % interval == 0,
    # local otherwise (sliding, or chunked when only attention_chunk_size is set); 0 = off.
    m.global_attention_interval = 0
    m.sliding_window = config_dict.placeholder(int)  # W: key j visible to query i iff i - W < j <= i
    m.attention_chunk_size = config_dict.placeholder(int)  # C (Llama 4): i // C == j // C
    m.partial_rotary_factor = 1.0  # rotate the first int(f * head_dim) dims (HF "default" semantics)
    m.rope_layout = "half"  # "half": rotate_half (Llama, SmolLM3); "interleaved": adjacent pairs
    m.rope_theta_local = config_dict.placeholder(float)  # RoPE base of local layers (Gemma 3); unscaled
    # Llama 4 query temperature on NoPE layers, (floor_scale, attn_scale):
    # q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1. Unset = off.
    m.nope_temperature = config_dict.placeholder(tuple)
    # "rms": learned per-head RMSNorm before RoPE; "rms_proj": learned RMSNorm over all heads' q (k) at once,
    # before RoPE (OLMo 2, OLMo Hybrid); "l2": weightless, after RoPE
    m.qk_norm = "none"
    # Mixture of experts (nopejax/moe.py); num_experts = 0 is a dense model. Layer i has an MoE
    # FFN when i >= num_dense_layers and (i + 1) % moe_layer_interval == 0 (Llama 4's
    # interleave_moe_layer_step; 1 = every layer), a dense SwiGLU of width d_ff otherwise.
    m.num_experts = 0
    m.experts_per_token = 2  # top-k
    m.expert_d_ff = 0  # width of each routed expert (HF moe_intermediate_size); 0 = d_ff
    m.num_shared_experts = 0  # always-on SwiGLU of width num_shared_experts * expert_d_ff
    # Qwen3-Next: the shared experts' output times sigmoid(h @ w), w [d_model, 1] learned per MoE layer
    m.shared_expert_gate = False
    m.router = "softmax"  # "softmax" (Mixtral, Switch) or "sigmoid" (DeepSeek-V3, AFMoE, Llama 4)
    m.router_normalize = False  # divide the top-k weights by their sum (AFMoE always does)
    m.routed_scale = 1.0  # multiply the routed output (AFMoE route_scale, DeepSeek routed_scaling_factor)
    m.router_scale_input = False  # Llama 4: scale each expert's input by its weight, not its output
    m.num_dense_layers = 0  # the first layers keep a dense FFN (AFMoE num_dense_layers)
    m.moe_layer_interval = 1
    m.capacity_factor = 0.0  # 0 = dropless; else each expert takes ceil(cf * S * k / E) tokens per row
    m.moe_dispatch = "allgather"  # tokens to the experts' devices under mesh.expert: allgather, all_to_all, ragged
    # allgather: the expert group's tokens go through the experts in this many chunks, one after the
    # other, each rematerialised, so the k-fold dispatch buffers are this many times smaller
    m.moe_dispatch_chunks = 1
    m.balance_loss_weight = 0.0  # Switch / GShard auxiliary load-balance loss
    m.router_z_loss_weight = 0.0  # ST-MoE router z-loss
    m.expert_bias_rate = 0.0  # aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load)
    # Mamba2 layers (layer_types "mamba2"; nopejax/mixers/mamba2.py): heads x head_dim inner width,
    # B and C shared by groups of heads, the SSM state size, the causal conv kernel, the SSD chunk
    m.mamba_num_heads = 0
    m.mamba_head_dim = 64
    m.mamba_groups = 1
    m.mamba_state_size = 128
    m.mamba_conv_kernel = 4
    m.mamba_chunk_size = 256
    m.mamba_conv_bias = True
    m.mamba_proj_bias = False  # biases on in_proj and out_proj
    # the intra-chunk SSD: "xla" (nopejax/mixers/ssd.py), or "pallas" (nopejax/kernels/ssd.py: the
    # [c, c] tiles stay in VMEM; TPU, or interpreted on CPU for tests; the chunk recurrence stays XLA)
    m.mamba_impl = "xla"
    m.mamba_time_step_limit = config_dict.placeholder(tuple)  # (min, max) clamp of dt; unset = none
    m.attention_scale = config_dict.placeholder(float)  # softmax scale of q.k; unset = 1 / sqrt(head_dim)
    # Gated DeltaNet layers (layer_types "gated_deltanet"; nopejax/mixers/gated_deltanet.py): G key
    # heads of K dims for q and k, H value heads of V dims (each key head serves H / G value heads)
    m.gdn_key_heads = 0
    m.gdn_value_heads = 0
    m.gdn_key_head_dim = 128
    m.gdn_value_head_dim = 128
    m.gdn_conv_kernel = 4
    m.gdn_chunk_size = 64
    m.gdn_allow_neg_eigval = False  # beta in (0, 2): eigenvalues of the transition in (-1, 1)
    m.gdn_norm_eps = config_dict.placeholder(float)  # eps of the output norm; unset = rms_norm_eps
    # the intra-chunk parts of the gated delta rule (UT transform, chunk outputs): "xla"
    # (nopejax/mixers/gated_delta.py) or "pallas" (nopejax/kernels/gdn.py: the [c, c] tiles stay in VMEM;
    # TPU, or interpreted on CPU for tests; the scan over chunk states stays XLA)
    m.gdn_impl = "xla"
    m.residual_scale = 1.0  # each sublayer's output times it before the residual add (Granite residual_multiplier)
    m.max_position_embeddings = 4096  # written to the HF config; nothing is sized by it
    m.tie_embeddings = True
    m.attention_bias = False  # biases on the q, k, v and o projections (HF `attention_bias`)
    m.mlp_bias = False  # biases on the gate, up and down projections (HF `mlp_bias`)
    m.mlp_activation = "swiglu"  # dense FFN: "swiglu" (gated, silu) or "relu2" (relu(x W_up)^2 W_down: Nemotron-H)
    m.rms_norm_eps = 1e-6  # eps of every norm, whichever model.norm is
    # norm weights stored as offsets from 1 (Qwen3-Next, Gemma): the block, final and q/k RMSNorms scale by
    # (1 + w), computed in fp32, and start at w = 0; the Gated DeltaNet output norm keeps its plain weight
    m.norm_unit_offset = False
    m.norm = "rms"  # block and final norms: "rms" or "layernorm" (mean-subtracted, no bias: Cohere2)
    # where the norms sit: "pre_norm" (Llama, SmolLM3), "parallel" (Cohere2: attention and MLP from one
    # norm, summed into the residual), "post_norm" (EXAONE 4: sublayer outputs normed, inputs not),
    # "sandwich" (Gemma 3, Arcee Trinity: both)
    m.block = "pre_norm"
    # the block form of the recurrent-mixer layers (Mamba2, Gated DeltaNet) where it differs from
    # model.block: OLMo Hybrid's attention layers are post_norm, its GDN layers pre_norm; unset = model.block
    m.recurrent_block = config_dict.placeholder(str)
    m.logit_scale = 1.0  # logits are multiplied by it (Cohere2's logit_scale)
    m.embed_scale = 1.0  # token embeddings are multiplied by it (AFMoE mup_enabled: sqrt(d_model))
    # AFMoE: the attended values times sigmoid(h @ W_gate) (h: the normed layer input), per head and
    # dim, before the output projection
    m.attention_gate = False
    m.hf_family = "smollm3"  # the transformers class `nopejax export` writes; import-hf sets its own
    m.init_std = 0.02
    m.dtype = "bfloat16"  # compute
    m.param_dtype = "float32"  # master weights
    m.attention_impl = "auto"
    m.scan_layers = True
    # "auto", "period" (blocks of the pattern's period, runs of equal specs nested) or "switch" (one
    # scan over the layers, a switch over the distinct specs: for irregular patterns, remat "full")
    m.scan_plan = "auto"
    # scanned stacks: a NoPE layer that equals a RoPE layer but for its positions runs that layer's
    # traced body, rotating by angle 0 (exact), so RoPE x3 + NoPE traces one layer (layers.traced_specs)
    m.shared_rope_body = True
    m.remat = "none"

    cfg.mesh = mesh = ConfigDict()
    mesh.data = -1  # -1: whatever devices the other axes leave
    mesh.fsdp = 1
    mesh.context = 1  # context parallelism: each row's sequence split over this many devices
    mesh.tensor = 1
    mesh.expert = 1  # expert parallelism: experts split over it; the batch too, outside MoE layers
    mesh.dcn_data = 1  # across slices / nodes
    mesh.dcn_fsdp = 1
    mesh.dcn_context = 1

    cfg.train = t = ConfigDict()
    t.steps = 300
    t.global_batch_size = 16
    t.seq_len = 128
    t.grad_accum = 1
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 4
    t.sample_every = 0  # a greedy continuation of a fixed prompt to TensorBoard + metrics.jsonl; 0 = off
    t.seed = 0
    t.z_loss = 0.0
    # LM head + loss over sequence chunks of this length (0 = whole sequence); saves the
    # [B, S, V] fp32 logits at large vocabularies. Must divide seq_len.
    t.loss_chunk_len = 0
    # a step with a non-finite loss or gradient norm applies no update; this many in a row stop the run
    t.max_nonfinite_steps = 5
    # after SIGTERM or a first Ctrl-C, the step in progress and its checkpoint get this many seconds;
    # past them (a hung step) the process exits non-zero, naming the newest complete checkpoint
    t.stop_grace_seconds = 600

    cfg.optim = o = ConfigDict()
    o.lr = 3e-3
    o.schedule = "wsd"
    # Below 1: a fraction of train.steps (levanter's convention), so the schedule follows any
    # --config.train.steps; 1 or more: a number of steps.
    o.warmup_steps = 0.1
    o.decay_steps = 0.2  # wsd: length of the final decay; cosine/linear: total decay length (0 = to the end)
    o.min_lr_ratio = 0.0
    o.weight_decay = 0.1
    o.decay_embeddings = False
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.clip_norm = 1.0

    cfg.data = d = ConfigDict()
    d.source = "default"
    d.path = ""  # a file glob (or a directory of prepared shards)
    d.text_field = "text"
    d.text_unit = "file"  # plain text: one document per "file" or per blank-line-separated "block"
    d.packing = "concat"  # "concat": fill rows, split documents at row ends; "pad": split only over-long ones
    d.eval_fraction = 0.02
    d.tokenizer = "byte"  # or the path of a HuggingFace tokenizer.json
    d.add_bos = True
    d.add_eos = True
    d.shuffle = True
    d.num_workers = 0  # grain worker processes; 0 = in the main process
    # Disjoint data shards, each one packed stream of global_batch_size / num_shards rows, spread
    # over the processes; the global batch depends only on this. 0 = one per row, which fits any
    # process count; fewer (a multiple of the process count) only to cut per-shard overhead.
    d.num_shards = 0
    d.mixture_weights = config_dict.placeholder(tuple)  # one weight per entry of a comma-separated path
    # Synthetic length-generalization tasks (data.source = copy / reverse / parity; passkey rows
    # are train.seq_len long and ignore the lengths). Packed: several whole examples per train row.
    d.task_packed = False
    d.task_train_min_len = 1
    d.task_train_max_len = 20
    d.task_test_min_len = 21
    d.task_test_max_len = 40

    cfg.checkpoint = c = ConfigDict()
    c.every_steps = 100
    c.keep = 3
    c.keep_period = 0  # also keep every N-th step forever; 0 = off
    c.async_save = True

    cfg.init_from = ""  # params of another run (a workdir or checkpoint dir) to start from
    # Staged training (SmolLM3's 4k -> 32k -> 64k): what else init_from carries over besides the params.
    cfg.init_from_optimizer = False  # True: the source's AdamW moments too (nanotron load_optimizer)
    cfg.init_from_schedule = "reset"  # "reset": step 0, the schedule starts over; "continue": the source's step
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def load_config(path: str) -> ConfigDict:
    """A config file: a Python file defining `get_config()`, or a run's DIR/config.json (complete,
    as `nopejax train` wrote it). Keys that `base_config()` does not have are refused, as on the
    command line: a misspelt field would otherwise be carried along and never read."""
    if not os.path.isfile(path):
        raise ConfigError("--config", f"file {path!r} does not exist", "pass a path such as configs/tiny.py")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid JSON ({e})", "pass a run's config.json") from None
        if not isinstance(saved, dict):
            raise ConfigError("--config", f"{path} holds no config object", "pass a run's config.json")
        return from_dict(saved, source=path)
    if not path.endswith(".py"):
        raise ConfigError(
            "--config", f"{path} is neither a Python config (.py) nor a run's config.json",
            "pass e.g. configs/tiny.py or WORKDIR/config.json",
        )  # fmt: skip
    spec = importlib.util.spec_from_file_location("_nopejax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError("--config", f"{path} has no get_config()", "define get_config() returning a ConfigDict")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(
            "--config",
            f"get_config() in {path} returned {type(cfg).__name__}",
            "return the ConfigDict of base_config()",
        )
    _check_known_keys(cfg, base_config(), "", path)
    return cfg


def _unknown_key(key: str, known: Iterable[str], prefix: str, where: str) -> ConfigError:
    """The error for a key the schema lacks, naming the nearest one that exists."""
    nearest = difflib.get_close_matches(key, list(known), n=1, cutoff=0.0)
    fix = f"use `{prefix}{nearest[0]}`, the nearest existing key" if nearest else "remove it"
    return ConfigError(prefix + key, f"no such config key ({where})", fix)


def _check_known_keys(cfg: ConfigDict, base: ConfigDict, prefix: str, where: str) -> None:
    for key in cfg:
        if key not in base:
            raise _unknown_key(key, base.keys(), prefix, f"set in {where}")
        if isinstance(base[key], ConfigDict) and isinstance(cfg[key], ConfigDict):
            _check_known_keys(cfg[key], base[key], f"{prefix}{key}.", where)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as bfloat16 or a path


def apply_overrides(cfg: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Apply `KEY=VALUE` strings (`model.d_model=256`, `optim.schedule=cosine`) to `cfg`."""
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.removeprefix("--config.").removeprefix("config.")
        if not eq:
            raise ConfigError(key, "an override needs the form KEY=VALUE", f"write --config.{key}=VALUE")
        *parents, leaf = key.split(".")
        node, prefix = cfg, ""
        for part in parents:
            if part in node and not isinstance(node[part], ConfigDict):
                raise ConfigError(
                    key, f"`{prefix}{part}` is a field, not a section", f"write --config.{prefix}{part}=VALUE"
                )
            if part not in node:
                sections = [k for k in node if isinstance(node[k], ConfigDict)]
                nearest = difflib.get_close_matches(part, sections, n=1, cutoff=0.0)
                fix = f"use `{prefix}{nearest[0]}`, the nearest existing section" if nearest else "remove it"
                raise ConfigError(key, "no such config section", fix)
            node, prefix = node[part], f"{prefix}{part}."
        if leaf not in node:
            raise _unknown_key(leaf, node.keys(), prefix, "on the command line")
        value = _parse_value(text)
        old = node[leaf]
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(key, f"{text!r} is not a boolean", "use true or false")
            value = text.lower() in ("true", "1")
        elif isinstance(old, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(old, str):
            value = text
        elif isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(key, f"{text!r} has the wrong type ({e})", f"give a {type(old).__name__}") from None
    return cfg


def to_dict(cfg: ConfigDict) -> dict:
    return json.loads(cfg.to_json_best_effort())


def from_dict(d: dict, source: str = "a saved config") -> ConfigDict:
    """Rebuild a config from `to_dict` output (e.g. a workdir's config.json) over the defaults."""
    cfg = base_config()
    _merge(cfg, d, prefix="", source=source)
    return cfg


def _merge(cfg: ConfigDict, d: dict, prefix: str, source: str) -> None:
    for k, v in d.items():
        if k == HISTORY_KEY and not prefix:  # a workdir's config.json carries its stage history
            continue
        if k not in cfg:
            raise ConfigError(prefix + k, f"unknown key in {source}", "remove it or upgrade nopejax")
        if isinstance(cfg[k], ConfigDict):
            if not isinstance(v, dict):
                raise ConfigError(prefix + k, f"is a section but {source} gives {v!r}", "give a JSON object")
            _merge(cfg[k], v, prefix + k + ".", source)
        else:
            try:
                cfg[k] = tuple(v) if isinstance(v, list) else v
            except TypeError as e:
                raise ConfigError(prefix + k, f"{v!r} in {source} has the wrong type ({e})", "fix the value") from None


# ---------------------------------------------------------------------------------------------
# Quantities derived from the fields, read by the run and by validation alike


def schedule_lengths(optim: ConfigDict, total_steps: int) -> tuple[int, int]:
    """(warmup, decay) in steps: a value below 1 is a fraction of `total_steps` (rounded down, so
    fractions that sum to at most 1 always fit the run), 1 or more a number of steps."""

    def steps(v: float) -> int:
        return int(v * total_steps) if v < 1 else int(v)

    return steps(optim.warmup_steps), steps(optim.decay_steps)


def context_chunk(cfg: ConfigDict) -> int | None:
    """Rows of each zig-zag chunk (seq_len / (2 x context devices)); None without context parallelism."""
    C = cfg.mesh.context * cfg.mesh.dcn_context
    return cfg.train.seq_len // (2 * C) if C > 1 else None


def __getattr__(name: str):
    """Old spellings kept for one release: `config.validate` and `config.check_platform` (now in
    nopejax.validation), `config.HF_FAMILIES` (now nopejax/hf/registry.py's NAMES, the one list)."""
    import warnings

    # only this shim imports upward: validation and hf import config, not the reverse
    if name in ("validate", "check_platform"):
        from nopejax import validation

        warnings.warn(f"nopejax.config.{name} is now nopejax.validation.{name}", FutureWarning, stacklevel=2)
        return getattr(validation, name)
    if name == "HF_FAMILIES":
        from nopejax.hf import registry

        warnings.warn("nopejax.config.HF_FAMILIES is now nopejax.hf.registry.NAMES", FutureWarning, stacklevel=2)
        return registry.NAMES
    raise AttributeError(f"module 'nopejax.config' has no attribute {name!r}")
