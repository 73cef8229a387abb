"""Verification: a build's graphs and engines against the PyTorch reference (Polygraphy), its report."""
