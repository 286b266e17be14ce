"""Causal depthwise conv1d over the sequence, as Mamba2 applies it to x, B and C before the scan.

y_t = bias + sum_k w_k * u_{t-(K-1)+k}, per channel, zero before the row's start (transformers'
`causal_conv1d_fn`: `nn.Conv1d(groups=channels, padding=K-1)` cut to S outputs). Its weight is kept
as [K, E] (transformers': [E, 1, K]).

Shape letters: B batch, S sequence, E conv channels, K kernel width, W = K - 1 window length.

Packed documents: a tap reaches back only within the token's own document (`ssd.document_starts`),
so a packed row equals each document run alone. The window carried between calls (decode, chunked
prefill, context-parallel pieces) is the last W inputs of the current document, zeros elsewhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from nopejax.mixers.ssd import document_starts


def causal_conv(x_BSE, w_KE, b_E=None, *, segment_ids_BS=None, segment_id_before_B=None, window_BWE=None):
    """-> (y_BSE, window_BWE): the conv over S positions after `window` (zeros if None), and the new window."""
    Bsz, S, E = x_BSE.shape
    K = w_KE.shape[0]
    W = K - 1
    window_BWE = jnp.zeros((Bsz, W, E), x_BSE.dtype) if window_BWE is None else window_BWE.astype(x_BSE.dtype)
    u_BTE = jnp.concatenate([window_BWE, x_BSE], axis=1)  # T = W + S
    if segment_ids_BS is None:
        taps_valid = [None] * K
    else:
        # document count per position; the window belongs to the document position 0 continues
        starts_BS = document_starts(segment_ids_BS, segment_id_before_B)
        doc_BT = jnp.concatenate([jnp.zeros((Bsz, W), jnp.int32), jnp.cumsum(starts_BS, axis=1, dtype=jnp.int32)], 1)
        taps_valid = [(doc_BT[:, k : k + S] == doc_BT[:, W:])[..., None] for k in range(K)]
    y_BSE = jnp.zeros((Bsz, S, E), jnp.float32)
    for k in range(K):
        tap_BSE = u_BTE[:, k : k + S].astype(jnp.float32) * w_KE[k].astype(jnp.float32)
        y_BSE += tap_BSE if taps_valid[k] is None else jnp.where(taps_valid[k], tap_BSE, 0)
    if b_E is not None:
        y_BSE += b_E
    new_BWE = u_BTE[:, S:]
    if segment_ids_BS is not None:
        real_BT = jnp.concatenate([jnp.ones((Bsz, W), bool), segment_ids_BS != 0], 1)
        keep_BW = (doc_BT[:, S:] == doc_BT[:, -1:]) & real_BT[:, S:]
        new_BWE = jnp.where(keep_BW[..., None], new_BWE, 0)
    return y_BSE.astype(x_BSE.dtype), new_BWE


def conv_step(x_BE, w_KE, b_E, window_BWE):
    """One token: -> (y_BE, window_BWE), O(K) per channel."""
    u_BKE = jnp.concatenate([window_BWE.astype(x_BE.dtype), x_BE[:, None]], axis=1)
    y_BE = jnp.einsum("bke,ke->be", u_BKE.astype(jnp.float32), w_KE.astype(jnp.float32))
    if b_E is not None:
        y_BE += b_E
    return y_BE.astype(x_BE.dtype), u_BKE[:, 1:]
