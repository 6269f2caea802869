"""Reproducible benchmarks: each prints ratios measured in one run (the machines are shared and noisy)."""
