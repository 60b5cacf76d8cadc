"""seqguard: real-time risk scoring of e-commerce user behaviour sequences."""
__version__ = "0.1.0"
