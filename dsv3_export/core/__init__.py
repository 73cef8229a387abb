"""The bottom layer: errors, the model config, FP8 block numerics, the build directory, progress.
Imports nothing of ours outside core."""
