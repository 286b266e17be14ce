"""nopejax: pretrain decoder LMs that mix RoPE and NoPE layers, in JAX/Flax NNX."""
