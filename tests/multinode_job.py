"""Run by tests/test_node_loss.py as a subprocess (its own Ray, apart from the session's):

    python tests/multinode_job.py MODEL DATA STORE OUT.json

A 3-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): a head with 0 CPUs (the
driver, the death registry) and worker nodes of 2 CPUs. Featurize runs on node A alone;
right after the driver writes its first shard, node B joins and A is removed without grace
(its raylet and workers killed: the featurize actor and decode tasks on it die). Then a query
runs on B alone; while its score task stalls (CTRAK_FAULT scan-stall), node C joins and B is
removed. OUT.json: the ingest summary and the query hits.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np


def main(model: str, data: str, store: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from test_faults import _config

    from pipeline.cluster import ray_session
    from pipeline.ingest import ingest
    from pipeline.query import QuerySpec, run_queries
    from pipeline.store import FeatureStore

    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system},
    )
    nodes = {"a": cluster.add_node(num_cpus=2)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    config = _config(model, data, store)
    events: list[str] = []
    original = FeatureStore.write_shard

    def write_shard(self, *args, **kwargs):
        entry = original(self, *args, **kwargs)
        if "a" in nodes:  # after the first shard: move the work to a new node, kill A
            nodes["b"] = cluster.add_node(num_cpus=2)
            cluster.remove_node(nodes.pop("a"), allow_graceful=False)
            events.append(f"node A removed after shard {args[0].id}")
        return entry

    FeatureStore.write_shard = write_shard
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    FeatureStore.write_shard = original
    # the query: its score task stalls on B, B is removed, C takes over
    marker = os.environ["CTRAK_FAULT"].split("once=")[1]

    spec = QuerySpec("a red circle", concept="red", image=np.full((16, 16, 3), 120, np.uint8))
    answer: dict = {}

    def query() -> None:  # in a thread: adding a node must run in the main thread
        with ray_session(config.ray):
            answer["results"], _ = run_queries(config, [spec], top_k=4)

    thread = threading.Thread(target=query)
    thread.start()
    while not os.path.exists(marker):
        time.sleep(0.1)
    nodes["c"] = cluster.add_node(num_cpus=2)
    cluster.remove_node(nodes.pop("b"), allow_graceful=False)
    events.append("node B removed mid-scan")
    thread.join()
    results = answer["results"]
    hits = [(h.shard, h.key, h.score) for h in results[0].hits]
    with open(out, "w") as handle:
        json.dump({"summary": summary.to_dict(), "hits": hits, "events": events}, handle)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
