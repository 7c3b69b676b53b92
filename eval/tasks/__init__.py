"""Local lm-eval tasks (YAML here, datasets from build.py)."""
