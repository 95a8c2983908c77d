"""Two ./run_train.sh launches on this machine (NNODES=2, node ranks 0 and 1, 2 processes each) form one
4-rank job over a loopback c10d rendezvous, and train FSDP(2) x TP(2) exactly as one 4-process launch.

c10d assigns global ranks in the order the nodes join, not by NODE_RANK; each node still holds two
consecutive ranks, so the job is the same job whichever launch gets ranks 0-1.
"""

from __future__ import annotations

import os
import re
import subprocess

from jobs import ROOT, RunningJob, free_port, read_metrics

STEPS = 4
TIMEOUT_S = 240  # two launches of two processes each share 2 cores: 40-60 s when the machine is idle


def job_args(dump) -> list[str]:
    return [
        "--job.dump_folder", str(dump),
        "--training.steps", str(STEPS),
        "--model.n_layers", "2",  # the debug model's width, fewer blocks: a third of the CPU time per step
        "--training.seq_len", "32",
        "--training.local_batch_size", "2",
        "--training.global_batch_size", "4",
        "--metrics.log_freq", "1",
        "--metrics.no_enable_tensorboard",
        "--parallelism.data_parallel_shard_degree", "2",
        "--parallelism.tensor_parallel_degree", "2",
        "--debug.deterministic",
    ]


def test_two_nodes_of_two_train_like_one_node_of_four(tmp_path):
    with RunningJob(tmp_path / "single.log", job_args(tmp_path / "single"), env={"NGPU": "4"}) as job:
        rc = job.wait(TIMEOUT_S)
        single_out = job.output()
    assert rc == 0, single_out[-6000:]

    dump = tmp_path / "multi"  # one folder for both nodes, as on a shared file system
    port = free_port()
    node_env = {"NNODES": "2", "NGPU": "2", "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": f"test-{port}"}
    with (
        RunningJob(tmp_path / "node0.log", job_args(dump), env={**node_env, "NODE_RANK": "0"}) as node0,
        RunningJob(tmp_path / "node1.log", job_args(dump), env={**node_env, "NODE_RANK": "1"}) as node1,
    ):
        rc0, rc1 = node0.wait(TIMEOUT_S), node1.wait(TIMEOUT_S)
        out = node0.output() + node1.output()
    assert (rc0, rc1) == (0, 0), out[-8000:]

    # One world of 4: global rank 0 (on whichever node) lists all four ranks and both dims.
    assert "world 4" in out and "rank 3: host" in out, out[-6000:]
    assert "collective check passed on world (4), dp_shard (2), tp (2)" in out, out[-6000:]
    # Each node shows its local rank 0 (LOG_RANK=0): the lines name the global rank, once.
    for rank in (0, 2):
        assert re.search(rf"^\[rank{rank}\]:\d\d:\d\d:\d\d INFO torchtitan_like", out, re.M), out[-6000:]
    assert not re.search(r"^\[rank\d+\]:\[rank\d+\] ", out, re.M), out[-6000:]

    single = read_metrics(tmp_path / "single")
    multi = read_metrics(dump)
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in multi] == [r["loss"] for r in single]
    assert [r["grad_norm"] for r in multi] == [r["grad_norm"] for r in single]


def test_slurm_script_derives_the_launch_from_slurm_variables(tmp_path):
    """tools/slurm_train.sbatch with fake srun / scontrol: what each node's run_train.sh gets, and the
    requeue after a pre-empted (exit 75) run."""
    fake_bin, repo = tmp_path / "bin", tmp_path / "repo"
    fake_bin.mkdir()
    repo.mkdir()
    scripts = {
        fake_bin / "scontrol": (
            '#!/bin/bash\nif [[ $1 == show ]]; then printf "node1\\nnode2\\n"; '
            f'else echo "$*" >> {tmp_path}/scontrol.log; fi\n'
        ),
        # srun on "node 1": drop srun's options, run the task command.
        fake_bin / "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n',
        repo / "run_train.sh": (
            '#!/bin/bash\necho "NNODES=$NNODES NODE_RANK=$NODE_RANK NGPU=$NGPU RDZV_ENDPOINT=$RDZV_ENDPOINT '
            f'RDZV_ID=$RDZV_ID ARGS=$*" > {tmp_path}/launched\nexit 75\n'
        ),
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "REPO": str(repo),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
    }
    r = subprocess.run(
        ["bash", str(ROOT / "tools" / "slurm_train.sbatch"), "--training.steps", "7"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 75, r.stdout + r.stderr
    assert (tmp_path / "launched").read_text().strip() == (
        "NNODES=2 NODE_RANK=1 NGPU=8 RDZV_ENDPOINT=node1:24242 RDZV_ID=4242 ARGS=--training.steps 7"
    )
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 4242"
