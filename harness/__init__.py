"""Shared plumbing: typed configs, offline assets, data and model loading, run records."""
