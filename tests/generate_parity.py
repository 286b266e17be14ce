"""Greedy decoding of an imported model against transformers' `generate` on the same checkpoint: the
tokens equal and their logits within 1e-4 of the largest (measured 7.9e-6, Granite 4.0-H), for each
batch of prompts (left-padded as transformers pads them)."""

import numpy as np
import torch

from nopejax import decode, model


def assert_greedy_equals_transformers(ours, ref, batches, max_new_tokens: int, prefill_chunk: int = 16) -> None:
    graphdef, params = model.split(ours)
    for prompts in batches:
        ids, logits = decode.generate_ids(graphdef, params, prompts, max_new_tokens, return_logits=True,
                                          prefill_chunk=prefill_chunk, eos_id=2, pad_id=0)  # fmt: skip
        L = max(map(len, prompts))
        padded = torch.tensor(np.stack([np.pad(p, (L - len(p), 0)) for p in prompts]), dtype=torch.long)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = ref.generate(padded, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=2, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
        np.testing.assert_array_equal(ids, out.sequences[:, L:].numpy())
        want = torch.stack(out.logits, 1).numpy()
        np.testing.assert_allclose(logits, want, atol=1e-4 * np.abs(want).max(), rtol=0)
