"""Training with the zero pattern fixed: the loop (devices, DDP, resume), the supervised and distillation tasks
it runs, DropConnect, and `finetune`, which loads a checkpoint, trains it and writes it back."""
