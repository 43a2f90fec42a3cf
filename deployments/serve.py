"""Serve the flows without a work pool: ``python -m atomforge.deployments.serve``."""

from __future__ import annotations

from prefect import serve

from atomforge.flows.inbox import inbox_screen
from atomforge.flows.screen import screen
from atomforge.flows.simulate import simulate


def main() -> None:
    """Serve the ``simulate``, ``screen`` and ``screen-inbox`` deployments from this process
    (the inbox one unscheduled: run it, or give it a schedule in the UI)."""
    serve(
        simulate.to_deployment(name="simulate-served", tags=["atomforge"]),
        screen.to_deployment(name="screen-served", tags=["atomforge"]),
        inbox_screen.to_deployment(name="screen-inbox-served", tags=["atomforge"]),
    )


if __name__ == "__main__":
    main()
