"""Environment variables through which ``tpgate load`` hands a run to the locustfile (each is also a locust
command-line option, so people can set them either way). The API key travels only here, never in argv."""

PROFILE_ENV = "TPGATE_LOAD_PROFILE"  # --workload-profile: shipped profile name or YAML path
RECORDS_ENV = "TPGATE_LOAD_RECORDS"  # --records: JSON lines file, one line per request
API_KEY_ENV = "TPGATE_LOAD_API_KEY"  # --api-key: bearer token for the target
