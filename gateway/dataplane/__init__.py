"""The request path: the router (a raw ASGI app), relaying engine responses, the upstream client, per-pool
concurrency gates, the routing policy, bearer-token checks and the gateway's own metrics."""
