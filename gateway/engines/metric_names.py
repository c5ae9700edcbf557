"""LMDeploy's engine metric names (LMDeploy 0.18, all prefixed ``lmdeploy:``), in one place.

The simulated engine exports exactly these, with the same types and labels (``model_name``, ``engine``),
so whatever reads them works unchanged against real LMDeploy.
"""

PREFIX = "lmdeploy:"

# gauges (LMDeploy refreshes its scheduler gauges every 10 s)
NUM_REQUESTS_RUNNING = "lmdeploy:num_requests_running"
NUM_REQUESTS_WAITING = "lmdeploy:num_requests_waiting"
GPU_CACHE_USAGE_PERC = "lmdeploy:gpu_cache_usage_perc"

# counters (exposition adds nothing: the names already end in _total)
PROMPT_TOKENS_TOTAL = "lmdeploy:prompt_tokens_total"
GENERATION_TOKENS_TOTAL = "lmdeploy:generation_tokens_total"
REQUEST_SUCCESS_TOTAL = "lmdeploy:request_success_total"  # label finished_reason

# histograms (seconds)
TIME_TO_FIRST_TOKEN_SECONDS = "lmdeploy:time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN_SECONDS = "lmdeploy:time_per_output_token_seconds"
E2E_REQUEST_LATENCY_SECONDS = "lmdeploy:e2e_request_latency_seconds"
REQUEST_QUEUE_TIME_SECONDS = "lmdeploy:request_queue_time_seconds"

LABELS = ("model_name", "engine")
FINISHED_REASON_LABEL = "finished_reason"
