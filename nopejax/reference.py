"""The generated reference: every config key and every command-line flag, as Markdown, and the
HF family lists of the README and the HF guide.

Types and defaults come from `config.base_config()` and flags from the argparse parsers, so the
reference cannot drift from the code; what each key means is in `FIELD_DOCS`, one line per leaf
key of `base_config()`. The HF families come from nopejax/hf/registry.py: the README's list and the
HF guide's table are the text between `<!-- families -->` and `<!-- /families -->` in those
hand-written pages (`SPANS`). tests/test_docs.py regenerates all of it and compares, and fails
when a key has no line here or a line names no key.

    python -m nopejax.reference            # rewrite docs/reference/config.md and cli.md, and the spans
    python -m nopejax.reference --check    # exit 1 when any is out of date
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

from ml_collections import config_dict

from nopejax import config
from nopejax.hf import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs" / "reference"

FIELD_DOCS = {
    # model: shapes
    "model.vocab_size": "Embedding rows and LM-head width; at least the tokenizer's vocabulary (byte: 259).",
    "model.d_model": "Width of the residual stream (D).",
    "model.num_layers": "Number of decoder layers (L).",
    "model.num_heads": "Query heads per layer (H).",
    "model.num_kv_heads": "Key/value heads per layer (K); must divide `num_heads` (GQA).",
    "model.head_dim": "Width of one attention head (E).",
    "model.d_ff": "Width of the dense SwiGLU FFN (F).",
    # model: positions
    "model.no_rope_layer_interval": "SmolLM3 semantics: layer i is NoPE when `(i + 1) % interval == 0`; "
    "0 = no NoPE layers.",
    "model.no_rope_layers": "Explicit per-layer list, 1 = RoPE, 0 = NoPE (SmolLM3's `no_rope_layers`); "
    "overrides the interval.",
    "model.rope_theta": "RoPE base of the RoPE layers.",
    "model.rope_scaling": 'HF `rope_scaling` dict (`linear`, `yarn`, `llama3`), e.g. `{"rope_type": "yarn", '
    '"factor": 4.0, "original_max_position_embeddings": 128}`; RoPE layers only.',
    "model.layer_types": "Mixer per layer: an attention kind (HF names `full_attention`, `sliding_attention`, "
    "`chunked_attention`), `mamba2` (the `mamba_*` fields), `gated_deltanet` (the `gdn_*` fields) or `mlp` "
    "(no mixer, an FFN-only layer); unset = all full attention.",
    "model.ffn_types": "FFN per layer: `dense`, `moe` or `none` (a mixer-only layer, Nemotron-H); unset = the MoE "
    "fields decide (dense everywhere without experts).",
    "model.global_attention_interval": "Shorthand (HF `sliding_window_pattern`): layer i is full when "
    "`(i + 1) % k == 0`, local otherwise (sliding, or chunked when only `attention_chunk_size` is set); 0 = off.",
    "model.sliding_window": "W of sliding layers: key j is visible to query i iff `pos_i - W < pos_j <= pos_i`.",
    "model.attention_chunk_size": "C of chunked layers (Llama 4): query and key in the same chunk, "
    "`pos_i // C == pos_j // C`.",
    "model.partial_rotary_factor": "Rotate the first `int(f * head_dim)` dims, frequencies over that width.",
    "model.rope_layout": "`half` (rotate_half: Llama, SmolLM3) or `interleaved` (adjacent pairs: Cohere2, Llama 4).",
    "model.rope_theta_local": "RoPE base of local (sliding or chunked) RoPE layers (Gemma 3), unscaled; "
    "unset = `rope_theta`.",
    "model.nope_temperature": "Llama 4 query temperature on NoPE layers, `(floor_scale, attn_scale)`: "
    "q times `log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`; unset = off.",
    "model.qk_norm": "`none`; `rms` (learned per-head RMSNorm before RoPE, all layers); `rms_proj` (learned "
    "RMSNorm over all heads' q, k at once, before RoPE, all layers: OLMo 2, OLMo Hybrid); "
    "`l2` (weightless, after RoPE, RoPE layers).",
    # model: mixture of experts
    "model.num_experts": "Routed experts X; 0 = a dense model.",
    "model.experts_per_token": "Top-k: experts each token is sent to.",
    "model.expert_d_ff": "Width of one routed expert (HF `moe_intermediate_size`); 0 = `d_ff`.",
    "model.num_shared_experts": "Always-on SwiGLU of width `num_shared_experts * expert_d_ff`.",
    "model.shared_expert_gate": "Qwen3-Next, Qwen3.5 MoE: the shared experts' output times `sigmoid(h @ w)`, "
    "`w` [D, 1] learned per MoE layer (param `shared_out_gate`); needs shared experts.",
    "model.router": "`softmax` (Mixtral, Switch) or `sigmoid` (DeepSeek-V3, AFMoE, Llama 4) scores.",
    "model.router_normalize": "Divide the top-k weights by their sum (AFMoE `route_norm`).",
    "model.routed_scale": "Multiply the routed output (AFMoE `route_scale`, DeepSeek `routed_scaling_factor`).",
    "model.router_scale_input": "Llama 4: the weight multiplies the expert's input, not its output.",
    "model.num_dense_layers": "The first layers keep a dense FFN (AFMoE `num_dense_layers`).",
    "model.moe_layer_interval": "After the dense layers, layer i is MoE when `(i + 1) % interval == 0` "
    "(Llama 4 `interleave_moe_layer_step`; 1 = every layer).",
    "model.capacity_factor": "0 = dropless; else at most `ceil(cf * S * k / X)` assignments per expert and "
    "sequence, earlier tokens first.",
    "model.moe_dispatch": "How tokens reach the experts' devices under `mesh.expert`: `allgather`, "
    "`all_to_all` (fixed buffers) or `ragged` (`ragged_all_to_all`: bytes follow the routing; TPU/GPU only). "
    "Same results; runtime only, not exported.",
    "model.moe_dispatch_chunks": "`allgather` only: run the gathered tokens through the experts in this many "
    "chunks, one after the other (each rematerialised): the dispatch buffers (k rows per token) shrink by "
    "this factor for one more expert forward in the backward. Runtime only.",
    "model.balance_loss_weight": "Switch/GShard load-balance loss `X * sum_e f_e * P_e`, averaged over MoE layers.",
    "model.router_z_loss_weight": "ST-MoE router z-loss `mean(logsumexp(logits)^2)`, averaged over MoE layers.",
    "model.expert_bias_rate": "Auxiliary-loss-free balancing (DeepSeek-V3): "
    "`bias += rate * sign(mean load - load)` after each step; 0 = off.",
    # model: the rest
    "model.max_position_embeddings": "Written to the HF config on export; nothing is sized by it.",
    "model.tie_embeddings": "The LM head is the transposed embedding.",
    "model.attention_bias": "Biases on the q, k, v and o projections (HF `attention_bias`).",
    "model.mlp_bias": "Biases on the gate, up and down projections (HF `mlp_bias`).",
    "model.mlp_activation": "Dense FFN: `swiglu` (silu(x W_gate) * x W_up, then W_down) or `relu2` (relu(x W_up)^2 "
    "W_down, not gated, no `w_gate`: Nemotron-H); relu2 is refused with experts (they are SwiGLU).",
    "model.rms_norm_eps": "Epsilon of every norm, whichever `model.norm` is.",
    "model.norm_unit_offset": "Norm weights are offsets from 1 (Qwen3-Next, Qwen3.5): the block, final and q/k "
    "RMSNorms scale by `1 + w` in fp32 and start at `w = 0`; a recurrent mixer's own norm keeps its plain weight.",
    "model.norm": "Block and final norms: `rms` or `layernorm` (mean-subtracted, no bias: Cohere2).",
    "model.block": "Where the norms sit: `pre_norm` (Llama, SmolLM3), `parallel` (Cohere2), "
    "`post_norm` (EXAONE 4), `sandwich` (Gemma 3, Arcee Trinity).",
    "model.recurrent_block": "The block form of the recurrent-mixer (Mamba2, Gated DeltaNet) layers where it "
    "differs from `block` (OLMo Hybrid: `post_norm` attention, `pre_norm` GDN layers); unset = `block`.",
    "model.logit_scale": "The logits are multiplied by it (Cohere2 `logit_scale`).",
    "model.attention_scale": "Softmax scale of `q . k` (Granite `attention_multiplier`); unset = `1 / sqrt(head_dim)`.",
    "model.residual_scale": "Each sublayer's output is multiplied by it before the residual add (Granite "
    "`residual_multiplier`).",
    # model: Mamba2 layers
    "model.mamba_num_heads": "Heads of each Mamba2 layer (its inner width is heads x `mamba_head_dim`); 0 when no "
    "layer is `mamba2`.",
    "model.mamba_head_dim": "Width of one Mamba2 head.",
    "model.mamba_groups": "Groups sharing B and C (`n_groups`); must divide `mamba_num_heads`.",
    "model.mamba_state_size": "SSM state size per head and channel (`state_size`, `d_state`).",
    "model.mamba_conv_kernel": "Width of the causal depthwise conv on x, B and C (`conv_kernel`, `d_conv`).",
    "model.mamba_chunk_size": "Chunk length of the chunked SSD scan: intra-chunk matmuls, a recurrence over chunks.",
    "model.mamba_conv_bias": "A bias on the conv (`use_conv_bias`).",
    "model.mamba_proj_bias": "Biases on `in_proj` and `out_proj` (`use_bias`, `mamba_proj_bias`).",
    "model.mamba_impl": "The intra-chunk part of the SSD scan: `xla`, or `pallas` (nopejax/kernels/ssd.py: "
    "score and decay tiles stay in VMEM; compiled for TPU, run in Pallas's interpreter on CPU, which is slow "
    "and for tests only; refused on GPU; `mamba_chunk_size` at most 512). The recurrence over chunks is XLA "
    "either way.",
    "model.gdn_key_heads": "Query/key heads G of each Gated DeltaNet layer; 0 when no layer is `gated_deltanet`.",
    "model.gdn_value_heads": "Value heads H of each Gated DeltaNet layer; a multiple of `gdn_key_heads`.",
    "model.gdn_key_head_dim": "Width K of one query/key head; the state is K x V per value head.",
    "model.gdn_value_head_dim": "Width V of one value head.",
    "model.gdn_conv_kernel": "Width of the causal depthwise conv on q, k and v (`linear_conv_kernel_dim`).",
    "model.gdn_chunk_size": "Chunk length of the chunked (WY / UT) delta rule.",
    "model.gdn_allow_neg_eigval": "beta = 2 sigmoid(b), so the transition's eigenvalues lie in (-1, 1) "
    "(OLMo Hybrid `linear_allow_neg_eigval`).",
    "model.gdn_norm_eps": "eps of the gated output norm; unset = `rms_norm_eps` (OLMo Hybrid: 1e-5).",
    "model.gdn_impl": "The intra-chunk parts of the gated delta rule (UT transform, chunk outputs): `xla`, or "
    "`pallas` (nopejax/kernels/gdn.py: pair decays, A, its inverse and the scores stay in VMEM; compiled for TPU, "
    "run in Pallas's interpreter on CPU, which is slow and for tests only; refused on GPU; `gdn_chunk_size` at "
    "most 256). The recurrence over chunk states is XLA either way.",
    "model.mamba_time_step_limit": "`(min, max)` clamp of dt after softplus (`time_step_limit`); unset = none.",
    "model.embed_scale": "Token embeddings are multiplied by it (AFMoE `mup_enabled`: sqrt(d_model)).",
    "model.attention_gate": "AFMoE, Qwen3-Next, Qwen3.5: attended values times `sigmoid(h @ W_gate)` per head and dim "
    "before the output projection.",
    "model.hf_family": "The transformers family `nopejax export` writes: "
    + ", ".join(f"`{f}`" for f in registry.NAMES)
    + "; `import-hf` sets its own.",
    "model.init_std": "Standard deviation of the normal initializer.",
    "model.dtype": "Compute dtype: " + ", ".join(f"`{d}`" for d in config.DTYPES) + ".",
    "model.param_dtype": "Dtype of the master weights and optimizer state.",
    "model.attention_impl": "`auto` (Pallas kernel on TPU, cuDNN on GPU for head dims 64/128, XLA on CPU), "
    "`xla`, `cudnn` or `pallas`.",
    "model.scan_layers": "Run the stack as a `lax.scan` over blocks of one layer-pattern period; "
    "False unrolls every layer. Checkpoints do not depend on it.",
    "model.scan_plan": "How a scanned stack is traced: `period` (blocks of the pattern's period, each "
    "run of equal layer specs a nested scan), `switch` (one scan over all layers whose step switches to "
    "its layer's spec: one traced body per distinct spec, for patterns without a short period, e.g. "
    "Nemotron-H; needs `model.remat=full`), or `auto` (`switch` where it traces fewer layer bodies and "
    "remat is `full`, else `period`). Checkpoints do not depend on it.",
    "model.shared_rope_body": "Scanned stacks: a NoPE attention layer that equals a RoPE layer in all but "
    "its positions runs the RoPE layer's traced body with a per-layer flag, rotating by angle 0 (cos 1, "
    "sin 0: exact), so SmolLM3's RoPE x3 + NoPE block traces one layer, not two (compile time). A NoPE "
    "layer then pays the rotation, O(S x D). Not for YaRN (its cos/sin factor) or layers whose NoPE form "
    "differs otherwise (Llama 4). False: separate bodies.",
    "model.remat": "Rematerialization per layer: " + ", ".join(f"`{r}`" for r in config.REMAT_POLICIES) + ".",
    # mesh
    "mesh.data": "Data-parallel axis; -1 = the devices the other axes leave.",
    "mesh.fsdp": "Fully sharded data parallel axis: params and optimizer state sharded over it.",
    "mesh.context": "Context parallelism: each row's sequence split over this many devices.",
    "mesh.tensor": "Tensor parallelism: heads, MLP width and vocab split over it.",
    "mesh.expert": "Expert parallelism: experts split over it; outside MoE layers it splits the batch.",
    "mesh.dcn_data": "Data parallelism across slices or nodes (the slow network).",
    "mesh.dcn_fsdp": "FSDP across slices or nodes.",
    "mesh.dcn_context": "Context parallelism across slices or nodes.",
    # train
    "train.steps": "Optimizer steps of the run (counted from the source's start with "
    '`init_from_schedule = "continue"`).',
    "train.global_batch_size": "Rows per step, over all devices and processes.",
    "train.seq_len": "Tokens per row.",
    "train.grad_accum": "Microbatches per step under a scan; the same gradient as the full batch.",
    "train.log_every": "Steps between `metrics.jsonl` lines.",
    "train.eval_every": "Steps between held-out evaluations (`eval_loss`).",
    "train.eval_batches": "Held-out batches per evaluation.",
    "train.sample_every": 'Steps between greedy 48-token continuations of `"The "` to TensorBoard and '
    "`metrics.jsonl`; 0 = off.",
    "train.seed": "Seed of the parameter init and the data order.",
    "train.z_loss": "Weight of the logit z-loss `logsumexp(logits)^2`; 0 = off.",
    "train.loss_chunk_len": "LM head and loss over sequence chunks of this length, so the [B, S, V] fp32 logits "
    "never exist at once; 0 = whole sequence; must divide `seq_len`.",
    "train.max_nonfinite_steps": "A step with a non-finite loss or gradient norm applies no update; this many "
    "in a row stop the run.",
    "train.stop_grace_seconds": "After SIGTERM or the first Ctrl-C, seconds the step in progress and its save may "
    "take; past that the process exits 1 naming the newest complete checkpoint.",
    # optim
    "optim.lr": "Peak learning rate of AdamW.",
    "optim.schedule": "Learning-rate schedule: " + ", ".join(f"`{s}`" for s in config.SCHEDULES) + ".",
    "optim.warmup_steps": "Linear warmup; below 1 a fraction of `train.steps`, 1 or more a number of steps.",
    "optim.decay_steps": "wsd: length of the final decay; cosine/linear: total decay length (0 = to the end); "
    "below 1 a fraction of `train.steps`.",
    "optim.min_lr_ratio": "Final learning rate as a fraction of `lr`.",
    "optim.weight_decay": "AdamW weight decay (never on norms).",
    "optim.decay_embeddings": "Apply weight decay to the embeddings too.",
    "optim.b1": "AdamW beta1.",
    "optim.b2": "AdamW beta2.",
    "optim.eps": "AdamW epsilon.",
    "optim.clip_norm": "Global gradient-norm clipping threshold; 0 = no clipping.",
    # data
    "data.source": "What to read: " + ", ".join(f"`{s}`" for s in config.DATA_SOURCES) + " (docs/guides/data.md).",
    "data.path": "A file glob (several comma-separated for a mixture), or a directory of prepared shards.",
    "data.text_field": "The JSONL field / Parquet column holding the text.",
    "data.text_unit": "Plain text: one document per `file` or per blank-line-separated `block`.",
    "data.packing": "`concat`: fill rows, split documents at row ends; `pad`: split only over-long documents.",
    "data.eval_fraction": "Fraction of the documents (hash-chosen) held out for evaluation.",
    "data.tokenizer": "`byte` (256 bytes + pad/bos/eos) or the path of a HuggingFace `tokenizer.json`.",
    "data.add_bos": "Put BOS at each document's start.",
    "data.add_eos": "Put EOS at each document's end.",
    "data.shuffle": "Shuffle the documents, seeded, per epoch.",
    "data.num_workers": "grain worker processes; 0 = in the main process.",
    "data.num_shards": "Disjoint data shards, each one packed stream; 0 = one per row of the global batch "
    "(fits any process count).",
    "data.mixture_weights": "One weight per entry of a comma-separated `data.path`.",
    "data.task_packed": "Synthetic tasks: several whole examples per training row, each its own segment.",
    "data.task_train_min_len": "Synthetic tasks: shortest input in training.",
    "data.task_train_max_len": "Synthetic tasks: longest input in training.",
    "data.task_test_min_len": "Synthetic tasks: shortest input beyond the training lengths in evaluation.",
    "data.task_test_max_len": "Synthetic tasks: longest input in evaluation.",
    # checkpoint
    "checkpoint.every_steps": "Steps between checkpoints.",
    "checkpoint.keep": "Newest checkpoints kept.",
    "checkpoint.keep_period": "Also keep every N-th step forever; 0 = off.",
    "checkpoint.async_save": "Write the arrays in the background while training goes on.",
    # staged training
    "init_from": "A workdir (its newest checkpoint) or a `checkpoints/STEP` dir whose params a new run starts from.",
    "init_from_optimizer": "With `init_from`: bring the source's AdamW moments too.",
    "init_from_schedule": "With `init_from`: `reset` starts at step 0 with a new warmup; `continue` starts at "
    "the source's step.",
}


def leaf_keys(cfg: config_dict.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf of a config, in definition order (`items()` sorts them)."""
    keys = []
    for k in cfg._fields:
        name, v = f"{prefix}{k}", cfg[k]
        if isinstance(v, config_dict.ConfigDict):
            keys += leaf_keys(v, name + ".")
        else:
            keys.append(name)
    return keys


def _field(cfg: config_dict.ConfigDict, key: str) -> tuple[str, str]:
    """(type, default) of one leaf, as shown in the table."""
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    value = node[leaf]
    if value is None:  # a placeholder: typed, unset
        return f"{node._fields[leaf].get_type().__name__} or None", "None"
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return type(value).__name__, text


def config_markdown() -> str:
    cfg = config.base_config()
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m nopejax.reference` from `nopejax.config.base_config()` (types and defaults)",
        "and `nopejax.reference.FIELD_DOCS` (meanings); `tests/test_docs.py` fails when this page is out of date.",
        "Override any key on the command line: `--config.SECTION.KEY=VALUE` (e.g. `--config.train.steps=100`);",
        "config files set the same keys and never add new ones.",
    ]
    section = None
    for key in leaf_keys(cfg):
        top = key.split(".")[0] if "." in key else "top level"
        if top != section:
            section = top
            lines += ["", f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        kind, default = _field(cfg, key)
        lines.append(f"| `{key}` | {kind} | `{default}` | {FIELD_DOCS[key]} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The command line


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@contextlib.contextmanager
def _capture_parser():
    """`nopejax data prepare` and `nopejax tokenizer` build their parsers inside their main
    functions; stop them at parse time to read the parser they built."""

    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def _parser_of(main) -> argparse.ArgumentParser:
    with _capture_parser():
        try:
            main([])
        except _Parsed as p:
            return p.parser
    raise RuntimeError(f"{main.__name__} parsed no arguments")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return {name: (helps.get(name, ""), p) for name, p in action.choices.items()}
    return {}


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = ", ".join(a.option_strings) if a.option_strings else a.dest.upper()
        if a.choices is not None:
            value = " \\| ".join(str(c) for c in a.choices)
        elif a.nargs == 0:
            value = "(flag)"
        else:
            value = (a.type.__name__ if a.type else "str") + (" ..." if a.nargs == "*" else "")
        required = a.required or not a.option_strings
        unset = a.default is None or a.default is False
        default = "required" if required else ("" if unset else f"`{a.default}`")
        meaning = (a.help or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {value} | {default} | {meaning} |")
    if not rows:
        return []
    return ["| argument | value | default | meaning |", "|---|---|---|---|", *rows]


def _command(title: str, summary: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = ["", f"## `{title}`", ""]
    for text in (summary, parser.description, parser.epilog):
        if text:
            lines += [text, ""]
    return lines + _arguments_table(parser)


def cli_markdown() -> str:
    from nopejax import cli
    from nopejax.data import commands

    lines = [
        "# Command-line reference",
        "",
        "Generated by `python -m nopejax.reference` from the argparse parsers in `nopejax/cli.py` and",
        "`nopejax/data/commands.py`; `tests/test_docs.py` fails when this page is out of date. Every command",
        "also takes `--help`. `train`, `import-hf`, `eval-length` and `data prepare` take config overrides",
        "`--config.SECTION.KEY=VALUE` (docs/reference/config.md) after their own arguments.",
    ]
    delegated = {"data": ("prepare", commands.prepare_main), "tokenizer": (None, commands.tokenizer_main)}
    for name, (summary, parser) in _subcommands(cli.build_parser()).items():
        if name not in delegated:
            lines += _command(f"nopejax {name}", summary, parser)
            continue
        action, main = delegated[name]
        own = _parser_of(main)
        if action is not None:  # the parser of the action itself
            lines += _command(f"nopejax {name} {action}", summary, own)
        else:  # a parser with its own subcommands
            for sub, (sub_summary, sub_parser) in _subcommands(own).items():
                lines += _command(f"nopejax {name} {sub}", sub_summary, sub_parser)
    return "\n".join(lines) + "\n"


PAGES = {"config.md": config_markdown, "cli.md": cli_markdown}


# ---------------------------------------------------------------------------------------------
# The HF families, inside hand-written pages


def families_line() -> str:
    """The README's list: every registered family, as the CLI help names them."""
    return registry.labels()


def families_table() -> str:
    """The HF guide's table: one row per registered family, its columns from the family's module."""
    lines = ["", "| `model_type` | family | block, norm | per layer | also |", "|---|---|---|---|---|"]
    for family in registry.REGISTERED:
        name = family.label if family.name == family.model_type else f"{family.label} (`hf_family` `{family.name}`)"
        lines.append(f"| `{family.model_type}` | {name} | " + " | ".join(family.guide_row) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- families -->", "<!-- /families -->"
SPANS = {"README.md": families_line, "docs/guides/huggingface.md": families_table}


def with_span(text: str, make) -> str:
    """`text` with what stands between BEGIN and END replaced by `make()`."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"no {BEGIN} ... {END} span")
    return head + BEGIN + make() + END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nopejax.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a page differs from the generated text")
    parser.add_argument("--out", default=str(DOCS_DIR), help="directory of the pages (default: docs/reference)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    stale = []
    for name, make in PAGES.items():
        path, text = out / name, make()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for name, make in SPANS.items():
        path = ROOT / name
        text = path.read_text()
        if with_span(text, make) == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.write_text(with_span(text, make))
    if stale:
        print(f"out of date: {', '.join(stale)}. Fix: python -m nopejax.reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
