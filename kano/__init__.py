"""Kano: zero-shot anomaly detection with CLIP (KAnoCLIP)."""

__version__ = "0.1.0"
