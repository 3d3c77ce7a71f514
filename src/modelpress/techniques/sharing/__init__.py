"""Weight sharing: per-layer k-means codebooks (Deep Compression) and hashed weights (HashedNets)."""

from modelpress.techniques.sharing import hashing, kmeans  # noqa: F401
