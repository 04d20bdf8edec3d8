"""Packaged experiments (small, deterministic, CPU-friendly)."""

from .digits import DigitsSplits, load_digits_splits, make_digits_mlp, train_digits_mlp

__all__ = ["DigitsSplits", "load_digits_splits", "make_digits_mlp", "train_digits_mlp"]
