"""modelpress: compress trained PyTorch models, with measured bytes, latency and accuracy."""
__version__ = "0.1.0"
