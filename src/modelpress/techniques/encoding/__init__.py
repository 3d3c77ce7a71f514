"""Entropy coding of the artifact's integer payloads (Huffman, ANS) through ``constriction``."""
