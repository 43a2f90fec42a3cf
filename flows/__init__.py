"""atomforge flows: thin Prefect flows over the reusable tasks in ``atomforge.flows.steps``."""
