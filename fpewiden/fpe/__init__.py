"""Pure tensor transforms of Fixed Parameter Expansion: splits, expansion, exact-budget pruning. No I/O."""
