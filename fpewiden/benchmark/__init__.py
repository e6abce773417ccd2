"""`fpewiden bench`: accuracy, bytes moved per storage format, measured latency, and their reports (table,
JSON, Markdown, Pareto plot). The repository's top-level bench/ holds the scripts that produce committed
results; this package is the command."""
