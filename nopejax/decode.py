"""Autoregressive decoding with a cache: one jitted prefill, then one jitted decode loop.

Shape letters as in model.py, plus T cache slots (prompt + new tokens), c query rows of this call
(the prompt in the prefill, 1 in a decode step), N new tokens, A attention layers, M the layers of
one recurrent mixer kind.

The cache is preallocated for the whole generation, so every decode step has the same shapes and
nothing recompiles per token; the decode loop is a `lax.while_loop` inside one jitted call (a
single dispatch for all N tokens), and it stops early once every row has produced EOS. Each layer
goes through model.py's own block (`model.block`: norms, projections, MLP, residuals);
only the mixer reads the cache, each kind its own stack of it: the KV cache holds the attention
layers alone (a hybrid with one attention layer in four carries a quarter of an all-attention
model's), and each recurrent layer (Mamba2, Gated DeltaNet: nopejax/mixers/kinds.py) keeps its
kind's cache (conv window, state). RoPE layers cache
rotated keys (rotated at their absolute position once, when written), NoPE layers cache raw keys.
A recurrent layer runs its chunked form over the prompt (its kind's `forward`, continuing the
cache from chunk to chunk of a chunked prefill) and one O(1) `step` per new token.

Which keys a query sees is computed from absolute positions and document ids stored next to the
cache (`visible`), not from the slot layout, plus the layer's sliding window or chunk
(`attention.local_visible`, the term the training paths use). Every layer option of
`layers.LayerSpec` is applied as `attention.attend` applies it. Prompts of different lengths
are left-padded: padding slots belong to document 0, which no real query sees and which leaves a
recurrent layer's state and conv window at zero, and each row's positions start at 0 at its first
real token, as in training and as transformers' generate does with an attention mask.

`nopejax.generate` is the function `generate` below, re-exported by the package.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from nopejax import attention, layers, model
from nopejax import rope as rope_lib
from nopejax.config import ConfigError
from nopejax.mixers import kinds as mixer_kinds

# what `train.sample_every` continues during training: short, neutral, any tokenizer encodes it
SAMPLE_PROMPT = "The "
SAMPLE_TOKENS = 48


class Sampling(NamedTuple):
    """Decoding settings, traced: changing them reuses the compiled program. temperature 0 = greedy,
    top_k 0 and top_p 1 = no filter."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> Sampling:
    """Reject impossible settings with the flag's name and the fix, before anything compiles."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be a positive integer, got {max_new_tokens!r}", "use e.g. 40")
    if not temperature >= 0:
        raise ConfigError("--temperature", f"must be >= 0, got {temperature}", "use 0 for greedy or e.g. 0.8")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError("--top-k", f"must be a positive integer, got {top_k!r}", "use e.g. 50, or leave it out")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {top_p}", "use e.g. 0.9, or leave it out")
    return Sampling(float(temperature), top_k or 0, 1.0 if top_p is None else float(top_p))


# the mixer kinds `_layer` decodes (none: an FFN-only layer)
CACHED_MIXERS = ("attention", *mixer_kinds.KINDS, "none")


class Cache(NamedTuple):
    """What every layer with a mixer keeps between calls, stacked by mixer kind."""

    k_ABTKE: jax.Array  # the attention layers' keys, in their order among the layers
    v_ABTKE: jax.Array
    recurrent: dict  # recurrent mixer kind -> its cache, each leaf stacked over that kind's layers [M, ...]
    pos_BT: jax.Array  # absolute position of each slot's key within its document
    seg_BT: jax.Array  # document id of each slot: 1 for the row's tokens, 0 for padding and empty slots


def empty_cache(m, batch: int, total_len: int) -> Cache:
    """Zeros for `batch` rows of `total_len` slots; `recurrent` holds the kinds the model has."""
    specs, dtype = layers.layer_specs(m), jnp.dtype(m.dtype)
    kv = jnp.zeros((model.group_count(specs, "attention"), batch, total_len, m.num_kv_heads, m.head_dim), dtype)
    recurrent = {}
    for name, kind in mixer_kinds.KINDS.items():
        count = model.group_count(specs, name)
        if count:
            one = kind.empty_cache(kind.dims(m), batch, dtype)
            recurrent[name] = jax.tree.map(lambda a, count=count: jnp.zeros((count, *a.shape), a.dtype), one)
    slots = jnp.zeros((batch, total_len), jnp.int32)
    return Cache(kv, kv, recurrent, slots, slots)


# ---------------------------------------------------------------------------------------------
# Attention over the cache


def visible(q_pos_Bc, q_seg_Bc, k_pos_BT, k_seg_BT, spec: layers.LayerSpec = attention.FULL):
    """[B, c, T] bool: causal and same document from absolute positions, plus the layer's window or chunk."""
    q_pos, k_pos = q_pos_Bc[:, :, None], k_pos_BT[:, None, :]
    ok = (k_pos <= q_pos) & (k_seg_BT[:, None, :] == q_seg_Bc[:, :, None])
    local = attention.local_visible(q_pos, k_pos, spec)
    return ok if local is None else ok & local


def cached_attention(q_BcHE, k_BTKE, v_BTKE, visible_BcT):
    """Softmax attention in fp32 (as attention.xla_attention), GQA by grouping query heads."""
    B, c, H, E = q_BcHE.shape
    K = k_BTKE.shape[2]
    q_BcKGE = q_BcHE.reshape(B, c, K, H // K, E)
    scores_BKGcT = jnp.einsum("bckge,btke->bkgct", q_BcKGE, k_BTKE, preferred_element_type=jnp.float32)
    scores_BKGcT = jnp.where(visible_BcT[:, None, None], scores_BKGcT * (E**-0.5), jnp.finfo(jnp.float32).min)
    probs_BKGcT = jax.nn.softmax(scores_BKGcT, axis=-1).astype(v_BTKE.dtype)
    out_BcKGE = jnp.einsum("bkgct,btke->bckge", probs_BKGcT, v_BTKE, preferred_element_type=jnp.float32)
    return out_BcKGE.reshape(B, c, H, E).astype(q_BcHE.dtype)


def _layer(p, x_BcD, i, cache: Cache, *, spec: layers.LayerSpec, slot, q_pos_Bc, q_seg_Bc, cos_sin, step: bool, m,
           dtype):  # fmt: skip
    """A layer on c new rows, in model.py's own block form -> (x_BcD, cache). `i` is its index among
    the layers of its mixer kind: its place in that kind's cache.

    Attention writes the rows' k/v at `slot` and attends over the cache as `spec` says (the order
    of attention.attend: RMS QK-norm, RoPE, L2 QK-norm, NoPE query temperature). A recurrent mixer
    continues its (conv window, state): the chunked form over the rows (padding, segment id 0, moves neither),
    or in a decode `step` the O(1) recurrence."""

    def attend(q_BcHE, k_BcKE, v_BcKE):
        if spec.use_rope:
            cos_BcR, sin_BcR = cos_sin[spec.rope]
            q_BcHE = rope_lib.apply_rope(q_BcHE, cos_BcR, sin_BcR, spec.rope_layout)
            k_BcKE = rope_lib.apply_rope(k_BcKE, cos_BcR, sin_BcR, spec.rope_layout)
        if spec.qk_norm == "l2":
            q_BcHE, k_BcKE = attention.l2_norm(q_BcHE, m.rms_norm_eps), attention.l2_norm(k_BcKE, m.rms_norm_eps)
        if spec.nope_temperature is not None:
            scale_Bc = attention.nope_temperature_scale(q_pos_Bc, *spec.nope_temperature)
            q_BcHE = (q_BcHE.astype(jnp.float32) * scale_Bc[:, :, None, None]).astype(q_BcHE.dtype)
        at = (i, 0, slot, 0, 0)
        k_ABTKE = jax.lax.dynamic_update_slice(cache.k_ABTKE, k_BcKE[None].astype(cache.k_ABTKE.dtype), at)
        v_ABTKE = jax.lax.dynamic_update_slice(cache.v_ABTKE, v_BcKE[None].astype(cache.v_ABTKE.dtype), at)
        visible_BcT = visible(q_pos_Bc, q_seg_Bc, cache.pos_BT, cache.seg_BT, spec)
        o_BcHE = cached_attention(q_BcHE, k_ABTKE[i], v_ABTKE[i], visible_BcT)
        return o_BcHE, cache._replace(k_ABTKE=k_ABTKE, v_ABTKE=v_ABTKE)

    def recur(h_BcD):
        kind = mixer_kinds.KINDS[spec.mixer]
        p_kind, d, stacked = mixer_kinds.layer_params(kind, p), kind.dims(m), cache.recurrent[spec.mixer]
        mine = jax.tree.map(lambda a: a[i], stacked)
        if step:
            out_BD, mine = kind.step(p_kind, h_BcD[:, 0], d, mine)
            out_BcD = out_BD[:, None]
        else:
            out_BcD, mine = kind.forward(p_kind, h_BcD, d, segment_ids_BS=q_seg_Bc, cache=mine)
        stacked = jax.tree.map(lambda a, new: a.at[i].set(new), stacked, mine)
        return out_BcD, cache._replace(recurrent={**cache.recurrent, spec.mixer: stacked})

    if spec.mixer in mixer_kinds.KINDS:
        mix = recur
    else:
        mix = lambda h_BcD: model.attention_sublayer(p, h_BcD, m, dtype, spec, attend)
    x_BcD, new_cache, _ = model.block(p, x_BcD, m, dtype, spec, mix)
    return x_BcD, cache if new_cache is None else new_cache  # None: an FFN-only layer, no mixer ran


def forward(module: model.Decoder, cache: Cache, tokens_Bc, pos_Bc, seg_Bc, slot, *, step: bool = False):
    """Run c new tokens (slots slot .. slot + c - 1) through the model -> (last row's logits [B, V], cache).
    `step`: one decode token per row (c = 1, every row real), for the recurrent mixers' O(1) step.

    Layers run in maximal runs of equal layer specs; a run is a `lax.scan` when the model scans
    its layers, so the traced program holds about one layer per run, as in training.
    """
    m = module.cfg
    dtype = jnp.dtype(m.dtype)
    cache = cache._replace(
        pos_BT=jax.lax.dynamic_update_slice(cache.pos_BT, pos_Bc, (0, slot)),
        seg_BT=jax.lax.dynamic_update_slice(cache.seg_BT, seg_Bc, (0, slot)),
    )
    cos_sin = {kind: rope_lib.cos_sin(pos_Bc, rope, m.rope_layout) for kind, rope in model.layer_ropes(m).items()}
    kw = dict(slot=slot, q_pos_Bc=pos_Bc, q_seg_Bc=seg_Bc, cos_sin=cos_sin, step=step, m=m, dtype=dtype)
    stack = {name: p[...] for name, p in module.layers.items()}
    x_BcD = module.embed_tokens(tokens_Bc)
    specs = layers.layer_specs(m)
    for start, length, spec in layers.runs(specs):
        layer = functools.partial(_layer, spec=spec, **kw)
        part = model.slice_layers(stack, specs, start, start + length)  # each stack by its own group's index
        # the run's first index in its mixer kind's cache (the cache groups are named as the mixers)
        first = model.group_count(specs[:start], spec.mixer) if spec.mixer != "none" else 0
        if length == 1 or not m.scan_layers:
            for j in range(length):
                x_BcD, cache = layer(jax.tree.map(lambda a, j=j: a[j], part), x_BcD, first + j, cache)
        else:

            def body(carry, xs, layer=layer):
                (x_BcD, cache), (p, i) = carry, xs
                return layer(p, x_BcD, i, cache), None

            (x_BcD, cache), _ = jax.lax.scan(body, (x_BcD, cache), (part, jnp.arange(first, first + length)))
    x_B1D = model.norm(x_BcD[:, -1:], module.final_norm[...], m)
    return module.logits(x_B1D)[:, 0], cache


# ---------------------------------------------------------------------------------------------
# Sampling


def sample(logits_BV, key, s: Sampling, greedy: bool):
    """Greedy (a static choice); else temperature, then top-k, then top-p, as transformers orders them."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    in_top_k_V = jnp.arange(V) < jnp.where(s.top_k > 0, s.top_k, V)
    # top-p over the top-k survivors: keep the most likely tokens until their mass reaches top_p
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    keep_BV = in_top_k_V & ((before_BV < s.top_p) | (s.top_p >= 1))
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The two jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef", "total_len", "chunk", "greedy"))
def prefill(graphdef, params, tokens_BS, pos_BS, seg_BS, key, sampling: Sampling, *, total_len: int, chunk: int,
            greedy: bool):  # fmt: skip
    """Fill a cache of `total_len` slots with the prompt -> (cache, first new token [B], its logits [B, V]).

    A prompt longer than `chunk` (then a multiple of it) goes in chunks under a scan, each
    attending to the cache filled so far (scores are [B, H, chunk, T], never [B, H, S, T]) and
    each recurrent layer continuing the state and conv window the chunk before left.
    """
    module = nnx.merge(graphdef, params)
    other = sorted({spec.mixer for spec in layers.layer_specs(module.cfg)} - set(CACHED_MIXERS))
    if other:  # raised while tracing, before anything compiles
        raise ConfigError(
            "model.layer_types", f"generation does not take {other} layers yet", f"use {CACHED_MIXERS} layers"
        )
    B, S = tokens_BS.shape
    cache = empty_cache(module.cfg, B, total_len)
    if chunk >= S:
        logits_BV, cache = forward(module, cache, tokens_BS, pos_BS, seg_BS, 0)
    else:

        def one_chunk(cache, xs):
            tokens_Bc, pos_Bc, seg_Bc, start = xs
            logits_BV, cache = forward(module, cache, tokens_Bc, pos_Bc, seg_Bc, start)
            return cache, logits_BV

        def to_chunks(a_BS):  # [B, S] -> [S / chunk, B, chunk]
            return jnp.moveaxis(a_BS.reshape(B, S // chunk, chunk), 1, 0)

        starts = jnp.arange(0, S, chunk, dtype=jnp.int32)
        cache, logits_nBV = jax.lax.scan(one_chunk, cache, (*map(to_chunks, (tokens_BS, pos_BS, seg_BS)), starts))
        logits_BV = logits_nBV[-1]
    return cache, sample(logits_BV, jax.random.fold_in(key, 0), sampling, greedy), logits_BV


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "keep_logits"))
def decode(graphdef, params, cache, first_B, first_logits_BV, key, sampling: Sampling, eos_id, pad_id, *,
           max_new_tokens: int, greedy: bool, keep_logits: bool):  # fmt: skip
    """All remaining tokens in one `while_loop` -> (tokens [B, N], steps taken, logits [B, N, V] or None).

    Step i feeds token i - 1 at slot S + i - 1 (S the prompt slots). Rows that produced `eos_id`
    (-1: none) feed `pad_id` and output it, until every row is done or N tokens exist.
    """
    module = nnx.merge(graphdef, params)
    B, N = first_B.shape[0], max_new_tokens
    S = cache.pos_BT.shape[1] - N
    last_pos_B = cache.pos_BT[:, S - 1]
    done_B = first_B == eos_id
    out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first_B)
    logits_BNV = jnp.zeros((B, N, first_logits_BV.shape[-1]), jnp.float32).at[:, 0].set(first_logits_BV)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, out_BN, done_B, logits_BNV = carry
        pos_B1, seg_B1 = (last_pos_B + i)[:, None], jnp.ones((B, 1), jnp.int32)
        logits_BV, cache = forward(module, cache, token_B[:, None], pos_B1, seg_B1, S + i - 1, step=True)
        token_B = jnp.where(done_B, pad_id, sample(logits_BV, jax.random.fold_in(key, i), sampling, greedy))
        done_B = done_B | (token_B == eos_id)
        out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, i))
        if keep_logits:
            logits_BNV = jax.lax.dynamic_update_slice(logits_BNV, logits_BV[:, None], (0, i, 0))
        return i + 1, token_B, cache, out_BN, done_B, logits_BNV

    carry = (jnp.int32(1), first_B, cache, out_BN, done_B, logits_BNV if keep_logits else None)
    steps, _, _, out_BN, _, logits_BNV = jax.lax.while_loop(cond, body, carry)
    return out_BN, steps, logits_BNV


# ---------------------------------------------------------------------------------------------
# Public entry points


PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: nearby lengths share one compile
PREFILL_CHUNK = 512  # longer prompts are prefilled in chunks of this many tokens


def left_pad(prompts, pad_id: int, chunk: int = PREFILL_CHUNK):
    """Prompts (sequences of ids) -> tokens, positions, document ids [B, S], left-padded to S
    (a multiple of PROMPT_BUCKET, or of `chunk` when longer than one)."""
    lengths = np.asarray([len(p) for p in prompts])
    if lengths.min() == 0:
        raise ConfigError("prompt", "a prompt has no tokens", "give at least one token (e.g. the BOS id)")
    bucket = PROMPT_BUCKET if lengths.max() <= chunk else chunk
    S = -(-lengths.max() // bucket) * bucket
    tokens = np.full((len(prompts), S), pad_id, np.int32)
    seg = np.zeros((len(prompts), S), np.int32)
    for row, (ids, n) in enumerate(zip(prompts, lengths)):
        tokens[row, S - n :] = ids
        seg[row, S - n :] = 1
    pos = np.maximum(np.arange(S)[None, :] - (S - lengths)[:, None], 0).astype(np.int32)
    return tokens, pos, seg


def generate_ids(graphdef, params, prompts, max_new_tokens: int = 40, sampling: Sampling | None = None, seed: int = 0,
                 *, eos_id: int | None = None, pad_id: int | None = None, return_logits: bool = False,
                 prefill_chunk: int = PREFILL_CHUNK):  # fmt: skip
    """The pure-params entry point (training samples, benchmarks): -> (tokens [B, n], logits [B, n, V] or None).

    `prompts` is a list of id sequences, possibly of different lengths. n <= max_new_tokens: the
    loop stops once every row has produced `eos_id`; rows done earlier are padded with `pad_id`
    after their EOS (transformers' convention).
    """
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    tokens_BS, pos_BS, seg_BS = left_pad([np.asarray(p, np.int32).reshape(-1) for p in prompts], pad_id, prefill_chunk)
    sampling = sampling or Sampling()
    key, greedy = jax.random.key(seed), sampling.temperature == 0
    sampling = Sampling(*(np.asarray(x, dtype) for x, dtype in zip(sampling, (np.float32, np.int32, np.float32))))
    cache, first_B, first_logits_BV = prefill(
        graphdef, params, tokens_BS, pos_BS, seg_BS, key, sampling,
        total_len=tokens_BS.shape[1] + max_new_tokens, chunk=prefill_chunk, greedy=greedy,
    )  # fmt: skip
    out_BN, steps, logits_BNV = decode(
        graphdef, params, cache, first_B, first_logits_BV, key, sampling, np.int32(-1 if eos_id is None else eos_id),
        np.int32(pad_id), max_new_tokens=max_new_tokens, greedy=greedy, keep_logits=return_logits,
    )  # fmt: skip
    if jax.process_count() > 1:  # outputs may span processes when params do
        out_BN, steps, logits_BNV = multihost_utils.process_allgather((out_BN, steps, logits_BNV), tiled=True)
    n = int(steps)
    return np.asarray(out_BN)[:, :n], None if logits_BNV is None else np.asarray(logits_BNV)[:, :n]


def generate(
    module: model.Decoder,
    prompt_ids,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    *,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_logits: bool = False,
):
    """Continue `prompt_ids` with a KV cache -> the new token ids (int32 numpy).

    A 1-D prompt gives a 1-D result that ends at the first `eos_id` (included, as transformers
    does). A 2-D array or a list of prompts (lengths may differ: they are left-padded) gives
    [B, n], rows padded with `pad_id` after their EOS. Greedy at temperature 0 (the default);
    else sampled with `seed`, after top-k and top-p filtering. With `return_logits`, also the
    float32 logits each new token was chosen from ([n, V] or [B, n, V]).
    """
    sampling = check_sampling(max_new_tokens, temperature, top_k, top_p)
    single = prompt_ids.ndim == 1 if hasattr(prompt_ids, "ndim") else np.ndim(prompt_ids[0]) == 0
    prompts = [prompt_ids] if single else list(prompt_ids)
    graphdef, params = model.split(module)
    ids_Bn, logits_BnV = generate_ids(
        graphdef, params, prompts, max_new_tokens, sampling, seed, eos_id=eos_id, pad_id=pad_id,
        return_logits=return_logits,
    )  # fmt: skip
    if single:
        ids_Bn = ids_Bn[:, : _stop(ids_Bn[0], eos_id)]
        logits_BnV = None if logits_BnV is None else logits_BnV[:, : ids_Bn.shape[1]]
        ids, logits = ids_Bn[0], None if logits_BnV is None else logits_BnV[0]
    else:
        ids, logits = ids_Bn, logits_BnV
    return (ids, logits) if return_logits else ids


def _stop(ids_n, eos_id: int | None) -> int:
    """Length up to and including the first EOS."""
    hits = np.flatnonzero(ids_n == eos_id) if eos_id is not None else []
    return int(hits[0]) + 1 if len(hits) else len(ids_n)


def encode_prompt(tokenizer, text: str, add_bos: bool) -> np.ndarray:
    """Text -> ids as training saw a document start: BOS first when the run adds one."""
    ids = tokenizer.encode(text)
    return np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32) if add_bos else ids


def training_sampler(graphdef, data_cfg, tokenizer):
    """-> sample(params) -> text: the greedy continuation of SAMPLE_PROMPT that training logs.

    Every process calls it (params may be sharded across processes); all get the same text.
    """
    prompt = encode_prompt(tokenizer, SAMPLE_PROMPT, data_cfg.add_bos)

    def sample_text(params) -> str:
        ids_Bn, _ = generate_ids(graphdef, params, [prompt], SAMPLE_TOKENS, eos_id=tokenizer.eos_id)
        ids = ids_Bn[0][: _stop(ids_Bn[0], tokenizer.eos_id)]
        return SAMPLE_PROMPT + tokenizer.decode(ids)

    return sample_text
