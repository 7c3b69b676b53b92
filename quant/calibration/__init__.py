"""The sequential calibration runner shared by every block-by-block method (runner.py), what a block sees during
calibration (capture.py), per-block checkpoints for resuming (checkpoint.py) and data-parallel reductions
(reduce.py)."""
