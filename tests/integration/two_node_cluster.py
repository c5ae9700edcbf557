"""A two-node Ray cluster on this machine, for the multi-node test: run as a script, it starts the head on 127.0.0.2
and a worker on 127.0.0.3 (``ray.cluster_utils.Cluster``, 4 simulated GPUs and 1 CPU each), prints
``{"address": ...}`` as one JSON line, then obeys lines on stdin: ``remove-worker`` (the worker node dies at once,
as a machine that fails) and ``stop`` (or end of input: everything it started stops). Ray's token authentication
comes from the environment it inherits."""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster

HEAD_ADDRESS, WORKER_ADDRESS = "127.0.0.2", "127.0.0.3"
NODE_RESOURCES = {"num_gpus": 4, "num_cpus": 1}


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_RESOURCES, "node_ip_address": HEAD_ADDRESS,
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(**NODE_RESOURCES, node_ip_address=WORKER_ADDRESS)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "remove-worker":
                cluster.remove_node(worker, allow_graceful=False)
                print("removed", flush=True)
            elif command == "stop":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
