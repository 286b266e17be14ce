"""Non-attention sequence mixers: the chunked scan, its state for decode and context parallelism."""
