"""Entropy coding of the artifact's integer payloads (Huffman, ANS) through ``constriction``."""

from modelpress.techniques.encoding import entropy  # noqa: F401
