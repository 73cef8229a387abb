"""Benchmarks: engines against the reference and against their memory bound, speculation's worth."""
