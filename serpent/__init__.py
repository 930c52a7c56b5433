"""Serpent: multi-scale selective-state-space image restoration (arXiv 2403.17902), our reading."""
from serpent import model  # noqa: F401  (registers serpent, serpent_t/s/b)
