"""Serving: the harness's configs driving LMDeploy (engine configs, api_server command lines), synthetic
checkpoints at real shapes, and decode rooflines. lmdeploy itself is an optional import, loaded only where an
engine is started."""
