"""tpgate's serving side: configuration, planner, engines, controller, router, metrics and admin API."""

__version__ = "0.1.0"
