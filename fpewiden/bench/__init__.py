"""`fpewiden bench`: bytes moved per storage format, measured latency, accuracy, Pareto front."""
