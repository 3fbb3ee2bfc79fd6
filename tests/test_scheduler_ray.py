"""Placement on a fake-GPU Ray cluster: the inventory read from Ray, and packs that land
only on nodes with their slice type and never run more at once than there are slices."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fleet.scheduler import Demand, PolicyConfig, plan
from fleet.scheduler.ray_inventory import inventory_from_ray

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

MIG_NODE = {"num_cpus": 2, "num_gpus": 2, "resources": {"fleet_slice_1g.10gb": 2, "accelerator_type:H100": 1}}
A10G_NODE = {"num_cpus": 2, "num_gpus": 3, "resources": {"accelerator_type:A10G": 1}}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    mig = c.add_node(**MIG_NODE)
    a10g = c.add_node(**A10G_NODE)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    yield {"mig": mig.node_id, "a10g": a10g.node_id}
    ray.shutdown()
    c.shutdown()


@ray.remote
def _run_pack(seconds: float) -> tuple[str, list, float, float]:
    start = time.time()
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids(), start, time.time()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def test_inventory_and_packs_land_on_matching_slices(cluster):
    inv = inventory_from_ray()
    groups = {(g.type.name, g.node): g.count for g in inv.groups}
    assert groups == {("h100-80gb:1g.10gb", cluster["mig"]): 2, ("a10g", cluster["a10g"]): 3}

    # enough small packs that every slice gets several, one after another
    n = 60
    d = Demand(
        company=np.zeros(n, np.int32),
        team=np.full(n, -1, np.int32),
        tier=np.zeros(n, np.int8),
        pending_tokens=np.full(n, 200_000),
        since_last_s=np.full(n, np.inf),
        frozen=np.zeros(n, bool),
        company_names=["acme"],
        company_shares=np.ones(1),
    )
    cfg = PolicyConfig(reserve_serving_fraction=0.0, max_pack_members=4)
    p = plan(d, inv, cfg, 0.0)
    assert len(p.packs) > inv.total
    refs, wanted = [], []
    for pack in p.packs:
        res = dict(pack.resources)
        gpus = res.pop("GPU")
        refs.append(_run_pack.options(num_cpus=0, num_gpus=gpus, resources=res).remote(0.3))
        wanted.append(pack.slice_profile)
    results = ray.get(refs, timeout=240)

    expected_node = {"h100-80gb:1g.10gb": cluster["mig"], "a10g": cluster["a10g"]}
    limit = {"h100-80gb:1g.10gb": 2, "a10g": 3}
    spans: dict[str, list[tuple[float, float]]] = {k: [] for k in limit}
    for profile, (node, gpu_ids, start, end) in zip(wanted, results, strict=True):
        assert node == expected_node[profile]  # a pack lands only where its slice type is
        assert len(gpu_ids) == 1  # the worker sees exactly one device (a MIG instance or a GPU)
        spans[profile].append((start, end))
    for profile, intervals in spans.items():
        assert intervals, profile
        assert _max_overlap(intervals) <= limit[profile]  # never more packs at once than slices
