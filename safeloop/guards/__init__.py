"""Guards: pure decisions over tensors (no Accelerator state, no I/O, no host reads)."""
