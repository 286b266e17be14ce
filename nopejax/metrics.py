"""FLOPs, MFU and the metric writers (metrics.jsonl, TensorBoard), process 0 only.

FLOPs are counted analytically as MaxText does (`calculate_tflops_training_per_device`):
every matmul with a weight costs 2 * tokens * fan_in * fan_out forward, causal attention
2 * 2 * B * S^2 * H * E / 2 per layer forward (QK^T and PV, halved by the mask), a recurrent
mixer the matmuls of its chunked form (`mixer_flops`), and training is 3x forward. XLA's cost
analysis is not used: it counts a scanned loop body once.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from nopejax import layers
from nopejax.config import ConfigDict

# bf16 dense peak FLOP/s per chip, by `device_kind` substring (first match wins).
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),  # v6e (Trillium) reports "TPU v6 lite"
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
]


def peak_flops(device: jax.Device) -> float | None:
    if device.platform == "cpu":
        return None
    return next((peak for key, peak in PEAK_FLOPS if key in device.device_kind), None)


def train_flops_per_step(cfg: ConfigDict) -> float:
    """Model FLOPs of one optimizer step over the global batch (forward + backward), summed layer by
    layer over what each layer's spec has: its mixer and its FFN."""
    m, t = cfg.model, cfg.train
    B, S = t.global_batch_size, t.seq_len
    tokens = B * S
    forward = 2 * tokens * m.d_model * m.vocab_size  # the LM head
    for spec in layers.layer_specs(m):
        forward += mixer_flops(spec, m, B, S) + 2 * tokens * ffn_params(spec, m)
    return 3.0 * forward


def mixer_flops(spec: layers.LayerSpec, m: ConfigDict, B: int, S: int) -> float:
    """Forward FLOPs of one layer's mixer over B rows of S tokens: its projections plus the sequence
    mixing itself (attention's scored pairs; a recurrent mixer's chunked form)."""
    tokens = B * S
    if spec.mixer == "attention":
        projections = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim * m.d_model
        projections += m.num_heads * m.head_dim * m.d_model if m.attention_gate else 0
        return 2 * tokens * projections + 2 * 2 * B * attended_pairs(spec, S) * m.num_heads * m.head_dim
    if spec.mixer == "mamba2":
        H, P, G, N, Q = m.mamba_num_heads, m.mamba_head_dim, m.mamba_groups, m.mamba_state_size, m.mamba_chunk_size
        inner = H * P
        projections = m.d_model * (2 * inner + 2 * G * N + H) + inner * m.d_model
        conv = m.mamba_conv_kernel * (inner + 2 * G * N)
        # per token: C.B^T over the causal half of its chunk (per group), those scores applied to x
        # (per head), its write into the chunk state and the incoming state read out by C
        ssd = Q / 2 * G * N + Q / 2 * inner + 2 * inner * N
        return 2 * tokens * (projections + conv + ssd)
    if spec.mixer == "gated_deltanet":
        G, H, K, V, Q = m.gdn_key_heads, m.gdn_value_heads, m.gdn_key_head_dim, m.gdn_value_head_dim, m.gdn_chunk_size
        projections = m.d_model * (2 * G * K + 2 * H * V + 2 * H) + H * V * m.d_model
        conv = m.gdn_conv_kernel * (2 * G * K + H * V)
        # per token and value head: k.k^T and q.k^T over the causal half of its chunk, the UT
        # transform applied to v and to k, the scores applied to the new values, and the state's
        # read (q, w) and write (k, u)
        delta = H * (Q * K + Q / 2 * (V + K) + Q / 2 * V + 4 * K * V)
        return 2 * tokens * (projections + conv + delta)
    return 0.0


def ffn_params(spec: layers.LayerSpec, m: ConfigDict) -> float:
    """Weights one token multiplies in this layer's FFN: an MoE layer counts its active ones (k routed
    experts, the shared ones and the router)."""
    if spec.ffn == "moe":
        expert = m.expert_d_ff or m.d_ff
        return 3 * m.d_model * expert * (m.experts_per_token + m.num_shared_experts) + m.d_model * m.num_experts
    if spec.ffn == "dense":
        return (2 if m.mlp_activation == "relu2" else 3) * m.d_model * m.d_ff
    return 0.0


def attended_pairs(spec: layers.LayerSpec, S: int) -> float:
    """(query, key) pairs one layer scores in a row of S tokens: S^2 / 2 causal (MaxText's count),
    about S * W for a sliding window W and S * C / 2 for chunks of C."""
    if spec.attention == "sliding" and spec.window < S:
        return spec.window * S - spec.window**2 / 2
    if spec.attention == "chunked" and spec.window < S:
        return S * spec.window / 2
    return S * S / 2


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch where it is
    installed only to accept torch tensors, which costs every `nopejax train` 2-6 s of its start;
    this module writes Python floats. (An import made while `sys.modules["torch"]` is None raises
    ImportError, which tensorboardX catches; torch imports normally afterwards.)"""
    blocked = "torch" not in sys.modules  # imported already: nothing to save, and it must stay
    if blocked:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """metrics.jsonl + TensorBoard. Only process 0 writes; other processes hold a no-op."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
            self._tb = summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            if v is not None:
                self._tb.add_scalar(k, float(v), int(step))

    def write_text(self, step: int, key: str, text: str) -> None:
        """A text record (e.g. a generated sample): its own metrics.jsonl line and a TensorBoard text."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), key: text}) + "\n")
        self._jsonl.flush()
        self._tb.add_text(key, text, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def truncate_after(workdir: str, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old records first."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)
