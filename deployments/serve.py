"""Serve both flows without a work pool: ``python -m atomforge.deployments.serve``."""

from __future__ import annotations

from prefect import serve

from atomforge.flows.screen import screen
from atomforge.flows.simulate import simulate


def main() -> None:
    """Serve the ``simulate`` and ``screen`` deployments from this process."""
    serve(
        simulate.to_deployment(name="simulate-served", tags=["atomforge"]),
        screen.to_deployment(name="screen-served", tags=["atomforge"]),
    )


if __name__ == "__main__":
    main()
