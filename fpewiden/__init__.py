"""fpewiden: Fixed Parameter Expansion (arXiv 2510.04500) as a deployment tool."""

__version__ = "0.1.0"
