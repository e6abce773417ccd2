"""Training: built-in tasks, the MLP that a state dict describes, and the mask-preserving loop."""
