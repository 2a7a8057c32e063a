"""Benchmarks with real traffic on loopback (accuracy, overhead, control plane)."""
