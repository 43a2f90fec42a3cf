"""Ways to deploy atomforge's flows: ``prefect.yaml`` (work pool) or ``serve`` (no pool)."""
