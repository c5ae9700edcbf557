"""Live engine endpoints per pool, kept by leases that pool replicas renew (level-triggered registration).

A pool replica asserts "my engine is healthy at URL" on every health check it passes. An assertion that changes
nothing only renews the lease; a retraction (the replica found its engine unhealthy, or the controller's own
probe could not reach it) removes the endpoint until the next assertion brings it back. An endpoint whose
lease runs out (a replica killed without a word) is dropped by :meth:`EndpointRegistry.expire`. So a missed
message or a slow probe heals by itself, and the view converges from repeated statements.

Pure: times are passed in (seconds on a monotonic clock).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Lease:
    url: str
    renewed_at_s: float


class EndpointRegistry:
    """Pool id -> replica id -> engine URL, with a lease per endpoint."""

    def __init__(self, *, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s}")
        self.lease_s = lease_s
        self._leases: dict[str, dict[str, _Lease]] = {}

    def assert_endpoint(self, pool_id: str, replica_id: str, url: str, *, now_s: float) -> bool:
        """Record that ``replica_id`` of ``pool_id`` serves at ``url``; True when routing changed (a new
        endpoint, or a new URL), False when it only renewed the lease."""
        replicas = self._leases.setdefault(pool_id, {})
        lease = replicas.get(replica_id)
        if lease is not None and lease.url == url:
            lease.renewed_at_s = now_s
            return False
        replicas[replica_id] = _Lease(url, now_s)
        return True

    def retract(self, pool_id: str, replica_id: str) -> bool:
        """Take an endpoint out of routing; True when it was there."""
        return self._leases.get(pool_id, {}).pop(replica_id, None) is not None

    def expire(self, *, now_s: float) -> list[tuple[str, str]]:
        """Drop endpoints whose lease was not renewed within ``lease_s``; returns (pool, replica) dropped."""
        dropped = []
        for pool_id, replicas in self._leases.items():
            for replica_id, lease in list(replicas.items()):
                if now_s - lease.renewed_at_s > self.lease_s:
                    del replicas[replica_id]
                    dropped.append((pool_id, replica_id))
        return dropped

    def drop_pool(self, pool_id: str) -> None:
        self._leases.pop(pool_id, None)

    def endpoints(self, pool_id: str) -> dict[str, str]:
        """Replica id -> URL of the pool's routable endpoints."""
        return {replica_id: lease.url for replica_id, lease in self._leases.get(pool_id, {}).items()}

    def all_endpoints(self) -> list[tuple[str, str, str]]:
        """Every (pool, replica, url)."""
        return [(pool_id, replica_id, lease.url)
                for pool_id, replicas in self._leases.items() for replica_id, lease in replicas.items()]
