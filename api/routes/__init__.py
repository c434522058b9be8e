"""HTTP routes: jobs, texts, and the operational endpoints (health, readiness, metrics)."""
