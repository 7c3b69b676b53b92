"""Entry points that wire the stages together from config (Hydra)."""
