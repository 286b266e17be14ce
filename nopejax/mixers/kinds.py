"""The recurrent mixer kinds a layer can have besides attention: one entry each, read by the model,
the decoder, validation and the tests.

A kind is the layer's `LayerSpec.mixer` and `model.layer_types` name, the prefix of its params in
the layer stacks (`mamba_in_proj`: Mamba2's `in_proj`), how its sizes come from the model config,
and its functions: params and init for one layer, the chunked forward over S tokens (from a cache
or from zero, with document resets) and the O(1) decode step. Adding a mixer = its module in
nopejax/mixers/, its config fields, and one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from nopejax.mixers import gated_deltanet, mamba2


class MixerKind(NamedTuple):
    name: str  # LayerSpec.mixer and the model.layer_types entry
    prefix: str  # of its params in the layer stacks: prefix + the mixer's own name
    dims: Callable  # model config -> the mixer's frozen dims
    params: Callable  # dims -> {name: (shape fn of dims, logical axes)}
    init: Callable  # (dims, key, dtype) -> {name: array}: one layer, as transformers initialises it
    forward: Callable  # (p, h_BSD, dims, *, segment_ids_BS=None, cache=None) -> (out_BSD, cache)
    step: Callable  # (p, h_BD, dims, cache) -> (out_BD, cache)
    empty_cache: Callable  # (dims, batch, dtype) -> cache
    hf_tensors: dict  # the mixer's own name -> (transformers' name inside the mixer, torch -> ours)


def _mamba2_dims(m) -> mamba2.Mamba2Dims:
    limit = (0.0, math.inf) if m.mamba_time_step_limit is None else tuple(float(x) for x in m.mamba_time_step_limit)
    return mamba2.Mamba2Dims(
        d_model=m.d_model, heads=m.mamba_num_heads, head_dim=m.mamba_head_dim, groups=m.mamba_groups,
        state=m.mamba_state_size, conv_kernel=m.mamba_conv_kernel, chunk=m.mamba_chunk_size,
        time_step_limit=limit, norm_eps=m.rms_norm_eps, use_bias=m.mamba_proj_bias, conv_bias=m.mamba_conv_bias,
        impl=m.mamba_impl,
    )  # fmt: skip


def _gated_deltanet_dims(m) -> gated_deltanet.GatedDeltaNetDims:
    return gated_deltanet.GatedDeltaNetDims(
        d_model=m.d_model, key_heads=m.gdn_key_heads, value_heads=m.gdn_value_heads,
        key_head_dim=m.gdn_key_head_dim, value_head_dim=m.gdn_value_head_dim, conv_kernel=m.gdn_conv_kernel,
        chunk=m.gdn_chunk_size, allow_neg_eigval=m.gdn_allow_neg_eigval,
        norm_eps=m.rms_norm_eps if m.gdn_norm_eps is None else m.gdn_norm_eps, impl=m.gdn_impl,
    )  # fmt: skip


KINDS = {
    "mamba2": MixerKind(
        "mamba2", "mamba_", _mamba2_dims, mamba2.mamba2_params, mamba2.init_params, mamba2.mamba2,
        mamba2.mamba2_step, mamba2.empty_cache, mamba2.HF_TENSORS,
    ),
    "gated_deltanet": MixerKind(
        "gated_deltanet", "gdn_", _gated_deltanet_dims, lambda d: gated_deltanet.GATED_DELTANET_PARAMS,
        gated_deltanet.init_params, gated_deltanet.gated_deltanet, gated_deltanet.gated_deltanet_step,
        gated_deltanet.empty_cache, gated_deltanet.HF_TENSORS,
    ),
}  # fmt: skip


def kind_of_param(name: str) -> MixerKind | None:
    """The mixer kind whose stacks hold the layer param `name`, or None (attention, norms, FFN)."""
    for kind in KINDS.values():
        if name.startswith(kind.prefix):
            return kind
    return None


def layer_params(kind: MixerKind, p: dict) -> dict:
    """One layer's params of this kind under the mixer's own names (the prefix dropped)."""
    return {name.removeprefix(kind.prefix): a for name, a in p.items() if name.startswith(kind.prefix)}
