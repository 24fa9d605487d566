"""What the students' metrics rows report of the cluster, from Ray's own accounting: the teacher pool's live
actors and the object-store bytes in use."""

from __future__ import annotations

import ray

from cluster.engine.pools import TEACHER_RESOURCE


def teacher_actors_alive() -> int:
    """Teacher-pool actors alive now, from Ray's state API (actors holding the "teacher" resource)."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         detail=True, limit=10_000, raise_on_missing_output=False)
    return sum(TEACHER_RESOURCE in (a.required_resources or {}) for a in actors)


def object_store_used_bytes() -> float:
    """Object-store bytes in use across the cluster, as the raylets count them (what ``ray memory --stats-only``
    prints; Ray has no public call for it): the stream's data in flight, and the few small objects of the run."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address), timeout_seconds=10)
    return float(reply.store_stats.object_store_bytes_used)
