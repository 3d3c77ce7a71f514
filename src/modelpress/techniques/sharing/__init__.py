"""Weight sharing: per-layer k-means codebooks (Deep Compression) and hashed weights (HashedNets)."""
