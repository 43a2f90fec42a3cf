"""atomforge flows: thin Prefect flows composed of the reusable tasks in ``flows.tasks``."""
