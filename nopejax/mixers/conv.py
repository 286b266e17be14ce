"""Causal depthwise conv1d over the sequence, as Mamba2 applies it to x, B and C before the scan.

y_t = bias + sum_j w_j * u_{t-(k-1)+j}, per channel, zero before the row's start (transformers'
`causal_conv1d_fn`: `nn.Conv1d(groups=channels, padding=k-1)` cut to S outputs). Its weight is kept
as [k, u] (transformers': [u, 1, k]).

Shape letters (docs/reference/shapes.md): B batch, S sequence, u conv channels, k kernel width (taps),
w = k - 1 window length, p = w + S the positions the taps read.

Packed documents: a tap reaches back only within the token's own document (`ssd.document_starts`),
so a packed row equals each document run alone. The window carried between calls (decode, chunked
prefill, context-parallel pieces) is the last w inputs of the current document, zeros elsewhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from nopejax.mixers.ssd import document_starts


def causal_conv(x_BSu, w_ku, b_u=None, *, segment_ids_BS=None, segment_id_before_B=None, window_Bwu=None):
    """-> (y_BSu, window_Bwu): the conv over S positions after `window` (zeros if None), and the new window."""
    Bsz, S, u = x_BSu.shape
    k = w_ku.shape[0]
    w = k - 1
    window_Bwu = jnp.zeros((Bsz, w, u), x_BSu.dtype) if window_Bwu is None else window_Bwu.astype(x_BSu.dtype)
    inputs_Bpu = jnp.concatenate([window_Bwu, x_BSu], axis=1)  # p = w + S
    if segment_ids_BS is None:
        taps_valid = [None] * k
    else:
        # document count per position; the window belongs to the document position 0 continues
        starts_BS = document_starts(segment_ids_BS, segment_id_before_B)
        doc_Bp = jnp.concatenate([jnp.zeros((Bsz, w), jnp.int32), jnp.cumsum(starts_BS, axis=1, dtype=jnp.int32)], 1)
        taps_valid = [(doc_Bp[:, tap : tap + S] == doc_Bp[:, w:])[..., None] for tap in range(k)]
    y_BSu = jnp.zeros((Bsz, S, u), jnp.float32)
    for tap in range(k):
        tap_BSu = inputs_Bpu[:, tap : tap + S].astype(jnp.float32) * w_ku[tap].astype(jnp.float32)
        y_BSu += tap_BSu if taps_valid[tap] is None else jnp.where(taps_valid[tap], tap_BSu, 0)
    if b_u is not None:
        y_BSu += b_u
    new_Bwu = inputs_Bpu[:, S:]
    if segment_ids_BS is not None:
        real_Bp = jnp.concatenate([jnp.ones((Bsz, w), bool), segment_ids_BS != 0], 1)
        keep_Bw = (doc_Bp[:, S:] == doc_Bp[:, -1:]) & real_Bp[:, S:]
        new_Bwu = jnp.where(keep_Bw[..., None], new_Bwu, 0)
    return y_BSu.astype(x_BSu.dtype), new_Bwu


def conv_step(x_Bu, w_ku, b_u, window_Bwu):
    """One token: -> (y_Bu, window_Bwu), O(k) per channel."""
    inputs_Bku = jnp.concatenate([window_Bwu.astype(x_Bu.dtype), x_Bu[:, None]], axis=1)
    y_Bu = jnp.einsum("bke,ke->be", inputs_Bku.astype(jnp.float32), w_ku.astype(jnp.float32))
    if b_u is not None:
        y_Bu += b_u
    return y_Bu.astype(x_Bu.dtype), inputs_Bku[:, 1:]
