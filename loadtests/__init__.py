"""Load tests: workload profiles as data, a locustfile for people and for tuner trials, and a bounded runner
that returns an exact summary.

The tuner calls :func:`run_load`; people run ``tpgate load`` or ``locust -f loadtests/locustfile.py``.
"""

from loadtests.errors import LoadRunError, LoadTestInputError
from loadtests.profile import Profile, load_profile, shipped_profiles, with_overrides
from loadtests.runner import check_host, run_load
from loadtests.summary import Summary, format_table, summarize

__all__ = [
    "LoadRunError",
    "LoadTestInputError",
    "Profile",
    "Summary",
    "check_host",
    "format_table",
    "load_profile",
    "run_load",
    "shipped_profiles",
    "summarize",
    "with_overrides",
]
