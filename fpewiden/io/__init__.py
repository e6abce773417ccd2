"""Files in and out, and nothing else: checkpoints (safetensors streaming, weights-only .pt, Hugging Face
folders), fpewiden's metadata, staged writes, and the rule of what an output may replace."""
