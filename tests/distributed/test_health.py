"""distributed/health.py on 4 gloo ranks laid out FSDP(2) x TP(2): rank report, collective checks
(healthy, wrong value, stuck), straggler statistics and process-group timeouts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from harness import run_on_ranks

CPU = torch.device("cpu")


def _dims(world: int, **degrees: int):
    from torchtitan_like.config.schema import Parallelism
    from torchtitan_like.distributed.parallel_dims import ParallelDims

    pd = ParallelDims.from_config(Parallelism(**degrees), world)
    pd.build_mesh("cpu")
    return pd


def _error_of(fn) -> str | None:
    from torchtitan_like.distributed.health import CollectiveCheckError

    try:
        fn()
    except CollectiveCheckError as e:
        return str(e)
    return None


def health_on_fsdp2_tp2() -> dict:
    from torchtitan_like.distributed.health import (
        check_collectives, log_ranks, named_meshes, process_groups, set_pg_timeouts, straggler_stats,
    )

    rank = dist.get_rank()
    pd = _dims(4, data_parallel_shard_degree=2, tensor_parallel_degree=2)
    meshes = named_meshes(pd)
    infos = log_ranks(CPU)
    healthy = _error_of(lambda: check_collectives(meshes, CPU, timeout_s=30))

    # Rank 2 is the straggler.
    stats = straggler_stats(2.5 if rank == 2 else 1.0 + 0.1 * rank, CPU)

    n_groups = set_pg_timeouts(pd, 7)
    timeouts = sorted(g._get_backend(CPU).options._timeout.total_seconds() for g in process_groups(pd))

    # A broken TP dim: the second rank of every TP pair adds garbage to what it sends.
    tp_group, tp_local = meshes["tp"].get_group(), meshes["tp"].get_local_rank()
    real_all_reduce = dist.all_reduce

    def corrupting_all_reduce(tensor, *args, group=None, **kwargs):
        if group is tp_group and tp_local == 1:
            tensor += 10
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = corrupting_all_reduce
    try:
        broken = _error_of(lambda: check_collectives(meshes, CPU, timeout_s=30))
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "hosts": [i.host for i in infos], "ranks": [i.rank for i in infos], "healthy": healthy, "stats": stats,
        "n_groups": n_groups, "timeouts": timeouts, "broken": broken,
    }


def test_health_checks_on_fsdp2_tp2(tmp_path):
    results = run_on_ranks(health_on_fsdp2_tp2, world_size=4, tmp_path=tmp_path, timeout_s=120)
    for rank, r in enumerate(results):
        assert r["ranks"] == [0, 1, 2, 3] and len(set(r["hosts"])) == 1
        assert r["healthy"] is None
        assert r["stats"] == {"host_time_max": 2.5, "host_time_median": (1.1 + 1.3) / 2, "slowest_rank": 2}
        # The default group, this rank's dp_shard group and its tp group, all at the new timeout.
        assert r["n_groups"] == 3 and r["timeouts"] == [7.0, 7.0, 7.0]
        tp_pair_error = "collective check on mesh dim 'tp' (2 ranks) failed on rank"
        assert r["broken"] is not None and tp_pair_error in r["broken"], (rank, r["broken"])
        assert "returned 13, expected 3" in r["broken"]


class _OneGroupMesh:
    """The three DeviceMesh methods check_collectives uses, over a plain process group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def get_group(self) -> dist.ProcessGroup:
        return self.group

    def get_local_rank(self) -> int:
        return dist.get_rank(self.group)

    def size(self) -> int:
        return dist.get_world_size(self.group)


def stuck_tp_check() -> str | None:
    """Rank 1 never joins the check's all_reduce on "tp" (a hung link); it does join the world check."""
    from torchtitan_like.distributed.health import check_collectives

    tp = _OneGroupMesh(dist.new_group([0, 1], backend="gloo"))
    # Start both checks together: a rank that reached this point seconds late (a busy CI core) would
    # otherwise fail rank 0's short world check instead of the "tp" one.
    dist.barrier()
    if dist.get_rank() == 1:
        check_collectives({}, CPU, timeout_s=30)  # the world check only
        return None
    return _error_of(lambda: check_collectives({"tp": tp}, CPU, timeout_s=2))


def test_a_stuck_collective_fails_the_check_naming_the_dim(tmp_path):
    rank0, _ = run_on_ranks(stuck_tp_check, world_size=2, tmp_path=tmp_path, timeout_s=60)
    # The world check passes (rank 1 joins that one), then "tp" never completes on rank 0.
    assert rank0 is not None and rank0.startswith(
        "collective check on mesh dim 'tp' (2 ranks) failed on rank 0: all_reduce raised or did not finish within 2 s"
    ), rank0
