"""A ``prefect deploy`` build step: schedules start off, and a redeploy leaves them be.

Prefect 3 (3.9 checked) writes a schedule's ``active`` from prefect.yaml on every
``prefect deploy``: ``active: false`` turns a schedule someone turned on off again. A
schedule that has a ``slug`` and no ``active`` keeps its state on a redeploy, but is
created on. This step tells the two cases apart; prefect.yaml templates ``active`` from
its output::

    build:
      - atomforge.deployments.schedules.schedule_state:
          id: schedule-state
          deployment: screen-inbox/screen-nightly
          slug: nightly
    schedules:
      - cron: "0 2 * * *"
        slug: nightly
        active: "{{ schedule-state.active }}"

A placeholder whose value is missing is dropped, so ``active`` is only sent for a
schedule the deployment does not have yet.
"""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound


def schedule_state(deployment: str, slug: str, active: bool = False) -> dict[str, bool]:
    """Return ``{"active": active}`` if ``deployment`` ("flow/name") has no schedule
    ``slug`` yet, else ``{}`` (the schedule keeps whatever state it has)."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return {"active": active}
    if any(schedule.slug == slug for schedule in existing.schedules or []):
        return {}
    return {"active": active}
