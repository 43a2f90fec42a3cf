"""Serve both flows without a work pool: ``python -m deployments.serve`` (Ctrl-C stops)."""

from __future__ import annotations

from prefect import serve

from flows.screen import screen
from flows.simulate import simulate


def main() -> None:
    """Serve the ``simulate`` and ``screen`` deployments from this process."""
    serve(
        simulate.to_deployment(name="simulate-served", tags=["atomforge"]),
        screen.to_deployment(name="screen-served", tags=["atomforge"]),
    )


if __name__ == "__main__":
    main()
