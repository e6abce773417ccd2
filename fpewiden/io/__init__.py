"""Checkpoints in and out: safetensors streaming, .pt state dicts (weights_only), Hugging Face directories."""
