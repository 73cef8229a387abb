"""CacheWrite: new latent rows written into a cache buffer in place, at each row's own length."""
