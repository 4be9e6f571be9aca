"""Checkpoints: training state as safetensors and JSON, written atomically and verified."""
