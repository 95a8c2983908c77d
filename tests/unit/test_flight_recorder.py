"""comm.trace_buf_size / save_traces_folder / save_traces_file_prefix: torch's flight recorder, set up
before the process groups exist (environment variables torch reads), and the dump a failing rank
writes (distributed/health.py; the job-level run is in tests/integration/test_failures.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtitan_like.distributed import health

ENV = (health.FR_BUFFER_ENV, health.FR_BUFFER_ENV_NCCL, health.FR_FILE_ENV, health.FR_FILE_ENV_NCCL,
       health.NCCL_DUMP_ON_TIMEOUT_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No recorder variables before, and none left after (they would reach later tests' subprocesses)."""
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    yield
    for k in ENV:
        os.environ.pop(k, None)
    health._SET_HERE.clear()


def test_the_recorder_is_configured_from_the_config(tmp_path):
    line = health.configure_flight_recorder(20000, tmp_path / "comm_traces" / "rank_")
    assert os.environ[health.FR_BUFFER_ENV] == "20000"
    assert os.environ[health.FR_FILE_ENV] == str(tmp_path / "comm_traces" / "rank_")
    assert os.environ[health.NCCL_DUMP_ON_TIMEOUT_ENV] == "1"
    assert (tmp_path / "comm_traces").is_dir()
    assert line == (f"flight recorder: the last 20000 collectives of each process group; a failing rank writes them "
                    f"to {tmp_path / 'comm_traces' / 'rank_'}<rank>")


def test_zero_turns_it_off(tmp_path):
    # torch records 2000 collectives when nothing says otherwise: 0 must be said.
    assert health.configure_flight_recorder(0, tmp_path / "rank_") is None
    assert os.environ[health.FR_BUFFER_ENV] == "0"
    assert health.dump_flight_recorder(0) is None


@pytest.mark.parametrize("file_env", [health.FR_FILE_ENV, health.FR_FILE_ENV_NCCL])
def test_the_jobs_own_environment_wins_and_is_named(tmp_path, monkeypatch, file_env):
    """Under either of the names torch reads (torchtitan sets the older file name)."""
    monkeypatch.setenv(health.FR_BUFFER_ENV_NCCL, "500")
    monkeypatch.setenv(file_env, str(tmp_path / "mine" / "trace_"))
    line = health.configure_flight_recorder(20000, tmp_path / "comm_traces" / "rank_")
    assert health.FR_BUFFER_ENV not in os.environ and (file_env == health.FR_FILE_ENV) == (health.FR_FILE_ENV in os.environ)
    assert line.startswith(f"flight recorder: the last 500 collectives of each process group; a failing rank writes "
                           f"them to {tmp_path / 'mine' / 'trace_'}<rank>")
    assert f"(from the environment: TORCH_NCCL_TRACE_BUFFER_SIZE=500, {file_env}=" in line
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "comm_traces").exists()


def test_a_folder_that_cannot_be_made_or_a_size_that_is_no_number_is_one_config_error(tmp_path, monkeypatch):
    from torchtitan_like.errors import ConfigError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"flight recorder: cannot create .*file/comm_traces \(comm.save_traces_folder\)"):
        health.configure_flight_recorder(100, tmp_path / "file" / "comm_traces" / "rank_")
    monkeypatch.setenv(health.FR_BUFFER_ENV, "20k")
    with pytest.raises(ConfigError, match="TORCH_FR_BUFFER_SIZE='20k' in the environment is not a number"):
        health.configure_flight_recorder(100, tmp_path / "ok" / "rank_")


_DUMP_SCRIPT = """
import sys
import torch, torch.distributed as dist
from pathlib import Path
from torchtitan_like.distributed import health
health.configure_flight_recorder(100, Path(sys.argv[1]) / "traces" / "rank_")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = torch.ones(4)
dist.all_reduce(t)
dist.broadcast(t, src=0)
print(health.dump_flight_recorder(0))
dist.destroy_process_group()
"""


def test_zero_records_nothing_where_torch_would_record(tmp_path):
    script = _DUMP_SCRIPT.replace("configure_flight_recorder(100,", "configure_flight_recorder(0,").replace(
        "print(health.dump_flight_recorder(0))",
        "import pickle; print(len(pickle.loads(torch._C._distributed_c10d._dump_fr_trace())['entries']))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "0"
    unconfigured = script.replace('health.configure_flight_recorder(0, Path(sys.argv[1]) / "traces" / "rank_")', "")
    assert unconfigured != script
    default = subprocess.run([sys.executable, "-c", unconfigured, str(tmp_path)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    assert default.strip() == "2", "torch's own default records: the test above would not show a change"


def test_a_dump_holds_the_collectives_and_names_the_last(tmp_path):
    """In a fresh process: torch reads the buffer size once, when a process creates its first group (as
    the trainer's processes do, configured before)."""
    out = subprocess.run([sys.executable, "-c", _DUMP_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    path = tmp_path / "traces" / "rank_0"
    assert out.startswith(f"flight recorder: rank 0's last collectives written to {path}"), out
    assert "; the last: gloo:broadcast #2 on process group 0 (default_pg) (torch's" in out, out  # (no gloo state)
    entries = pickle.loads(Path(path).read_bytes())["entries"]
    assert [e["profiling_name"] for e in entries] == ["gloo:all_reduce", "gloo:broadcast"]
    assert not list(path.parent.glob("*.tmp"))


_NCCL_SCRIPT = """
import sys
import torch, torch.distributed as dist
from pathlib import Path
from torchtitan_like.distributed import health
health.configure_flight_recorder(100, Path(sys.argv[1]) / "rank_")
torch.cuda.set_device(0)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
print(health.dump_flight_recorder(0))
dist.destroy_process_group()
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_nccl_dump_is_read_by_torchs_analyzer(tmp_path):
    """On NCCL the dump has the group table torch's fr_trace needs (gloo's lacks it in torch 2.13)."""
    out = subprocess.run([sys.executable, "-c", _NCCL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "; the last: nccl:all_reduce #" in out, out
    analyzed = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(tmp_path),
                               "--prefix", "rank_"], capture_output=True, text=True, timeout=300)
    assert analyzed.returncode == 0, analyzed.stdout[-3000:] + analyzed.stderr[-3000:]


def test_a_second_trainer_in_the_process_dumps_into_its_own_folder(tmp_path):
    # (torch sizes the recorder once per process: the buffer variable of the second is not a new size.)
    health.configure_flight_recorder(100, tmp_path / "first" / "rank_")
    line = health.configure_flight_recorder(200, tmp_path / "second" / "rank_")
    assert os.environ[health.FR_FILE_ENV] == str(tmp_path / "second" / "rank_")
    assert "from the environment" not in line
    assert health.configure_flight_recorder(0, tmp_path / "third" / "rank_") is None
    assert os.environ[health.FR_BUFFER_ENV] == "0" and os.environ[health.FR_FILE_ENV] == str(tmp_path / "third" / "rank_")


def test_an_nccl_job_dumps_nccls_own_recorder(tmp_path, monkeypatch):
    """NCCL's collectives are in ProcessGroupNCCL's recorder, not the generic one (an H200 run with torch 2.11
    found the generic dump of an NCCL job without its all_reduce). This CPU build has no NCCL: a stand-in for
    torch's binding takes the call, so what is checked is which recorder is read, and with which arguments."""
    import types

    calls = []
    entry = {"profiling_name": "nccl:all_reduce", "collective_seq_id": 7, "process_group": ("0", "default_pg"),
             "state": "completed"}

    def nccl_dump(**kwargs):
        calls.append(("nccl", kwargs))
        return pickle.dumps({"entries": [entry]})

    def generic_dump(**kwargs):
        calls.append(("generic", kwargs))
        return pickle.dumps({"entries": []})

    stand_in = types.SimpleNamespace(_dump_nccl_trace=nccl_dump, _dump_fr_trace=generic_dump)
    monkeypatch.setattr(torch._C, "_distributed_c10d", stand_in)
    health.configure_flight_recorder(100, tmp_path / "rank_")

    monkeypatch.setattr(health, "_default_group_uses_nccl", lambda: True)
    line = health.dump_flight_recorder(3)
    assert calls == [("nccl", {"includeCollectives": True, "includeStackTraces": True, "onlyActive": False})]
    assert "; the last: nccl:all_reduce #7 on process group 0 (default_pg), completed" in line, line
    assert pickle.loads((tmp_path / "rank_3").read_bytes())["entries"] == [entry]

    calls.clear()
    monkeypatch.setattr(health, "_default_group_uses_nccl", lambda: False)  # gloo: the generic recorder
    assert health.dump_flight_recorder(3).endswith("compares NCCL ranks' files)")
    assert [c[0] for c in calls] == ["generic"]


def test_the_default_group_names_nccl_in_a_per_device_backend(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for backend, nccl in (("cuda:nccl,cpu:gloo", True), ("nccl", True), ("gloo", False)):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert health._default_group_uses_nccl() is nccl, backend
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert health._default_group_uses_nccl() is False
