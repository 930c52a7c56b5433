"""Serpent model (work in progress: filled by the Serpent issue)."""
