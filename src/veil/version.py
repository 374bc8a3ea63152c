"""Veil's version, on its own so that any module can record it without importing the package (and train.py with it)."""

__version__ = "0.1.0"
