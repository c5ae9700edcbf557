"""Ray and Ray Serve: the builders that turn plain classes into actors and deployments, the pool replica and
the engine process it supervises, the Ray runtime, and the HAProxy guard."""
