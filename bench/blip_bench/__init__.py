"""Benchmarks and load: blip-bench, the soak, and the image corpora they send."""
