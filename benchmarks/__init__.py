"""scoopy benchmark harness: `python -m benchmarks --help`."""
