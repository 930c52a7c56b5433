"""Faithful re-implementations of the comparison models; importing registers them."""
from baselines import mambair, nafnet, restormer, swinir  # noqa: F401
