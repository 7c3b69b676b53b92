"""Scripts run by the peers' own interpreter (`python workers/<tool>_worker.py spec.json`); importable as modules too
(the layout test imports every module), so each imports its sibling `common` relatively when it can."""
