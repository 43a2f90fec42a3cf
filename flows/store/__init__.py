"""Results afterwards: one JSON document per structure and per run, and how to query them."""
