"""mambair (work in progress: filled by the baselines issue)."""
