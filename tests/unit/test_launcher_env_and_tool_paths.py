"""run_train.sh's variables, the rendezvous endpoint and the report/plan output paths: a bad value is one
`error:` line naming it, exit 2, before anything starts (no traceback, no fall-through to a real launch)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("restore_root_logger")  # (tests/conftest.py: dry_run.main sets up logging)
LAUNCH_VARS = ("NGPU", "NNODES", "NODE_RANK", "LOG_RANK", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT", "RDZV_ENDPOINT",
               "MASTER_ADDR", "MASTER_PORT", "COMM_MODE", "DRY_RUN_RANK", "DRY_RUN_DEVICE", "DRY_RUN_JSON",
               "DRY_RUN_SKIP_FILES", "DRY_RUN_STEP_CHECK", "DRY_RUN_STEP_CHECK_RANKS", "DRY_RUN_STEP_CHECK_TIMEOUT")


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A PYTHON that records its arguments instead of starting torchrun or the dry run (and answers
    run_train.sh's probe for torch, `-c ...`, with yes)."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/bash\n[[ "$1" == -c ]] && exit 0\necho "$*" > {tmp_path / "started"}\n')
    script.chmod(0o755)
    return script


def run_train(fake_python: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], str | None]:
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full.update(PYTHON=str(fake_python), **env)
    r = subprocess.run(["bash", str(ROOT / "run_train.sh"), "--training.steps", "0"], cwd=fake_python.parent,
                       env=full, capture_output=True, text=True, timeout=30)
    started = fake_python.parent / "started"
    return r, started.read_text().strip() if started.exists() else None


@pytest.mark.parametrize("env, message", [
    # 08 / 2x were bash arithmetic errors, after which the script went on to the real torchrun launch.
    ({"COMM_MODE": "fake_backend", "NGPU": "2x"}, "error: NGPU=2x must be a whole number >= 1: the processes"),
    ({"COMM_MODE": "fake_backend", "NGPU": "abc"}, "error: NGPU=abc must be a whole number >= 1"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "NNODES": "foo"}, "error: NNODES=foo must be a whole number >= 1"),
    ({"NGPU": "0"}, "error: NGPU=0 must be a whole number >= 1"),
    ({"NGPU": "-1"}, "error: NGPU=-1 must be a whole number >= 1"),
    ({"NGPU": "1", "NNODES": "0"}, "error: NNODES=0 must be a whole number >= 1"),
    ({"NGPU": "1", "NODE_RANK": "x"}, "error: NODE_RANK=x must be a whole number in 0..0"),
    ({"NGPU": "1", "NODE_RANK": "5"}, "error: NODE_RANK=5 must be a whole number in 0..0: this node's index among"
                                      " NNODES=1 node(s)"),
    ({"NGPU": "1", "MAX_RESTARTS": "-1"}, "error: MAX_RESTARTS=-1 must be a whole number >= 0"),
    ({"NGPU": "1", "MAX_RESTARTS": "abc"}, "error: MAX_RESTARTS=abc must be a whole number >= 0"),
    ({"NGPU": "1", "SHUTDOWN_TIMEOUT": "-5"}, "error: SHUTDOWN_TIMEOUT=-5 must be a whole number >= 0"),
    ({"NGPU": "1", "SHUTDOWN_TIMEOUT": "abc"}, "error: SHUTDOWN_TIMEOUT=abc must be a whole number >= 0"),
    ({"NGPU": "1", "LOG_RANK": "5"}, "error: LOG_RANK=5 names local rank 5, but NGPU=1 starts local ranks 0..0"),
    ({"NGPU": "2", "LOG_RANK": "0,2"}, "error: LOG_RANK=0,2 names local rank 2, but NGPU=2 starts local ranks 0..1"),
    ({"NGPU": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "abc"}, "error: MASTER_PORT=abc must be a whole"
                                                                      " number in 0..65535"),
    ({"NGPU": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "99999"}, "error: MASTER_PORT=99999 must be a whole"
                                                                        " number in 0..65535"),
    # MASTER_PORT without MASTER_ADDR on one node was ignored (a free port instead), so never checked either.
    ({"NGPU": "1", "MASTER_PORT": "abc"}, "error: MASTER_PORT=abc must be a whole number in 0..65535: the"
                                          " rendezvous port on this node (MASTER_ADDR unset: localhost)"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_SKIP_FILES": "yes"}, "error: DRY_RUN_SKIP_FILES=yes must"
                                                                              " be 1"),
    ({"COMM_MODE": "fake_backend", "NGPU": "2", "DRY_RUN_RANK": "2"}, "error: DRY_RUN_RANK=2 must be a whole number"
                                                                      " in 0..1"),
    ({"COMM_MODE": "fake_backend", "NGPU": "2", "NNODES": "2", "DRY_RUN_RANK": "x"}, "error: DRY_RUN_RANK=x must be"
                                                                                     " a whole number in 0..3"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_DEVICE": "tpu"}, "error: DRY_RUN_DEVICE=tpu is not a"
                                                                          " device type"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_STEP_CHECK": "1", "DRY_RUN_STEP_CHECK_TIMEOUT": "20m"},
     "error: DRY_RUN_STEP_CHECK_TIMEOUT=20m must be a whole number >= 1: the seconds each step-check launch"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_STEP_CHECK": "1", "DRY_RUN_STEP_CHECK_TIMEOUT": "0"},
     "error: DRY_RUN_STEP_CHECK_TIMEOUT=0 must be a whole number >= 1"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_a_bad_variable_is_one_error_line_and_nothing_starts(fake_python: Path, env: dict[str, str],
                                                             message: str) -> None:
    r, started = run_train(fake_python, **env)
    assert (r.returncode, started) == (2, None), (r.returncode, started, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message), r.stderr


def test_a_python_that_cannot_run_the_trainer_is_one_error_line(fake_python: Path) -> None:
    """PYTHON was not checked: a missing one was bash's 'No such file or directory' (127), one without torch
    an import traceback, /bin/false nothing at all."""
    no_torch = fake_python.parent / "python_without_torch"
    no_torch.write_text(f'#!/bin/bash\n[[ "$1" == -c ]] && exit 1\necho "$*" > {fake_python.parent / "started"}\n')
    no_torch.chmod(0o755)
    for python, message in ((fake_python.parent / "missing", "is not an interpreter found here"),
                            (no_torch, "cannot import torch: run tools/setup.sh")):
        r, started = run_train(python, NGPU="1")
        assert (r.returncode, started) == (2, None), (r.returncode, started, r.stderr)
        assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: PYTHON={python} {message}")


@pytest.mark.parametrize("env, expected", [
    # Leading zeros are decimal (bash would read 08 as octal), and reach torchrun / the dry run without them.
    ({"COMM_MODE": "fake_backend", "DRY_RUN_DEVICE": "cpu", "NGPU": "08"}, "--world-size 8 --rank 0 --device cpu"),
    ({"COMM_MODE": "fake_backend", "NGPU": "2", "NNODES": "2", "DRY_RUN_RANK": "3", "DRY_RUN_SKIP_FILES": "1"},
     "--world-size 4 --rank 3 --device cuda --skip-files"),
    ({"NGPU": "02", "LOG_RANK": "0,1", "MAX_RESTARTS": "0"}, "--nproc-per-node=2"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_STEP_CHECK": "1", "DRY_RUN_STEP_CHECK_TIMEOUT": "03600"},
     "--step-check --step-check-ranks 8 --step-check-timeout 3600"),
    ({"NGPU": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "029500"}, "--rdzv-endpoint=node0:29500"),
    ({"NGPU": "4", "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "node0:29500"}, "--node-rank=1"),
    # MASTER_PORT alone on one node: that port on localhost (it was dropped for a free port, localhost:0).
    ({"NGPU": "1", "MASTER_PORT": "029600"}, "--rdzv-endpoint=localhost:29600"),
    # The same endpoint twice: nothing is ignored, no warning.
    ({"NGPU": "1", "RDZV_ENDPOINT": "node0:29500", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
     "--rdzv-endpoint=node0:29500"),
    ({"NGPU": "1", "RDZV_ENDPOINT": "node0:29500", "MASTER_ADDR": "node0"}, "--rdzv-endpoint=node0:29500"),
    ({"NGPU": "1", "RDZV_ENDPOINT": "[::1]", "MASTER_PORT": "29400"}, "--rdzv-endpoint=[::1]"),
    # An IPv6 host, bracketed in the endpoint and bare (or bracketed) in MASTER_ADDR, is the same host.
    ({"NGPU": "1", "RDZV_ENDPOINT": "[::1]:29500", "MASTER_ADDR": "::1", "MASTER_PORT": "29500"},
     "--rdzv-endpoint=[::1]:29500"),
    ({"NGPU": "1", "RDZV_ENDPOINT": "[::1]:29500", "MASTER_ADDR": "[::1]"}, "--rdzv-endpoint=[::1]:29500"),
])
def test_valid_values_start_as_before(fake_python: Path, env: dict[str, str], expected: str) -> None:
    r, started = run_train(fake_python, **env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert started is not None and expected in started, started
    assert ("torchtitan_like.dry_run" in started) == (env.get("COMM_MODE") == "fake_backend"), started


@pytest.mark.parametrize("env, warning, expected", [
    # Once silently ignored: a DRY_RUN_STEP_CHECK=1 without COMM_MODE started the real job with no word.
    ({"NGPU": "1", "DRY_RUN_STEP_CHECK": "1", "DRY_RUN_JSON": "plan.json"},
     "run_train: warning: DRY_RUN_JSON=plan.json DRY_RUN_STEP_CHECK=1 do nothing without COMM_MODE=fake_backend: "
     "this is the real launch, not a dry run", "--nproc-per-node=1"),
    ({"COMM_MODE": "fake_backend", "NGPU": "1", "DRY_RUN_STEP_CHECK_RANKS": "4", "DRY_RUN_STEP_CHECK_TIMEOUT": "60"},
     "run_train: warning: DRY_RUN_STEP_CHECK_RANKS=4 DRY_RUN_STEP_CHECK_TIMEOUT=60 do nothing without "
     "DRY_RUN_STEP_CHECK=1: no step check runs after this dry run", "--world-size 1 --rank 0 --device cuda"),
    # MASTER_ADDR / MASTER_PORT beside RDZV_ENDPOINT were ignored without a word.
    ({"NGPU": "1", "RDZV_ENDPOINT": "node0:29500", "MASTER_ADDR": "node1", "MASTER_PORT": "29600"},
     "run_train: warning: MASTER_ADDR=node1 MASTER_PORT=29600 do nothing when RDZV_ENDPOINT is set: the rendezvous "
     "is RDZV_ENDPOINT=node0:29500", "--rdzv-endpoint=node0:29500"),
    ({"NGPU": "1", "RDZV_ENDPOINT": "node0:29500", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"},
     "run_train: warning: MASTER_PORT=29600 does nothing when RDZV_ENDPOINT is set: the rendezvous is "
     "RDZV_ENDPOINT=node0:29500", "--rdzv-endpoint=node0:29500"),
])
def test_variables_that_do_nothing_in_this_launch_are_named_in_one_warning(fake_python: Path, env: dict[str, str],
                                                                          warning: str, expected: str) -> None:
    r, started = run_train(fake_python, **env)
    assert r.returncode == 0 and r.stderr == warning + "\n", r.stderr
    assert started is not None and expected in started and "--step-check" not in started, started


# ---- launch.py: the rendezvous endpoint, before torchrun retries it until its timeout ------------------


def launch_main(monkeypatch, argv: list[str]) -> int:
    from torchtitan_like import launch

    def run(args):  # the real torchrun would start workers
        raise AssertionError("torchrun started")

    monkeypatch.setattr(launch, "run", run)
    return launch.main(argv)


def argv(endpoint: str, nnodes: str = "1") -> list[str]:
    return [f"--nnodes={nnodes}", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            "-m", "torchtitan_like.train"]


def test_an_endpoint_host_that_does_not_resolve_is_refused(monkeypatch, capsys) -> None:
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append((host, port))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("RDZV_ENDPOINT", "foo")
    assert launch_main(monkeypatch, argv("foo")) == 2
    assert asked == [("foo", 29400)]  # without a port: torchrun's default
    err = capsys.readouterr().err
    assert err.startswith("error: RDZV_ENDPOINT=foo: host 'foo' does not resolve here (Name or service not known)")
    assert err.count("\n") == 1, err

    monkeypatch.delenv("RDZV_ENDPOINT")
    monkeypatch.setenv("MASTER_ADDR", "nohost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch_main(monkeypatch, argv("nohost:29500")) == 2
    assert capsys.readouterr().err.startswith("error: MASTER_ADDR=nohost (rendezvous nohost:29500): host 'nohost'")


@pytest.mark.parametrize("endpoint, nnodes, message", [
    ("foo:99999", "1", "error: --rdzv-endpoint=foo:99999 is not host[:port] with a port in 0..65535"),
    ("foo:", "1", "error: --rdzv-endpoint=foo: is not host[:port]"),
    ("localhost:0", "2", "error: --rdzv-endpoint=localhost:0: port 0 (a free port picked on one node) cannot be found"),
])
def test_an_endpoint_that_is_not_host_port_is_refused(monkeypatch, capsys, endpoint, nnodes, message) -> None:
    for var in ("RDZV_ENDPOINT", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert launch_main(monkeypatch, argv(endpoint, nnodes)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("env, endpoint, message", [
    # The port is the fault: it named MASTER_ADDR, whose value was fine.
    ({"MASTER_ADDR": "localhost", "MASTER_PORT": "0"}, "localhost:0",
     "error: MASTER_PORT=0 (rendezvous localhost:0): port 0 (a free port picked on one node) cannot be found by the "
     "other nodes of NNODES=2: name a fixed port every node uses, e.g. MASTER_PORT=29500"),
    ({"RDZV_ENDPOINT": "localhost:0"}, "localhost:0",
     "error: RDZV_ENDPOINT=localhost:0: port 0 (a free port picked on one node) cannot be found by the other nodes "
     "of NNODES=2: name a fixed port every node uses, e.g. localhost:29500"),
])
def test_a_multi_node_port_0_names_the_variable_that_set_the_port(monkeypatch, capsys, env, endpoint,
                                                                   message) -> None:
    for var in ("RDZV_ENDPOINT", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launch_main(monkeypatch, argv(endpoint, "2")) == 2
    err = capsys.readouterr().err
    assert err == message + "\n", err


@pytest.mark.parametrize("endpoint", ["localhost:0", "127.0.0.1:29500", "[::1]:29500", "localhost"])
def test_a_resolvable_endpoint_goes_to_torchrun(monkeypatch, endpoint) -> None:
    from torchtitan_like import launch

    resolved = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: resolved.append((host, port)) or [])
    launch.check_rendezvous_endpoint(endpoint, "1")
    assert resolved and resolved[0][0] in ("localhost", "127.0.0.1", "::1"), resolved


# ---- dry run and tools/plan.py: output files -------------------------------------------------------------


def test_dry_run_report_path_that_cannot_be_a_file_is_refused_before_the_run(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    from torchtitan_like import dry_run

    monkeypatch.setattr(dry_run, "dry_run", lambda *a, **k: pytest.fail("the dry run started"))
    folder, afile = tmp_path / "somefolder", tmp_path / "afile"
    folder.mkdir()
    afile.write_text("x")
    monkeypatch.setenv("DRY_RUN_JSON", str(folder))
    assert dry_run.main(["--world-size", "1", "--json", str(folder)]) == 2
    assert capsys.readouterr().err == (f"error: DRY_RUN_JSON={folder} is a folder: name the file to write, "
                                       f"e.g. {folder / 'report.json'}\n")
    monkeypatch.delenv("DRY_RUN_JSON")
    assert dry_run.main(["--world-size", "1", "--json", str(afile / "r.json")]) == 2
    assert capsys.readouterr().err == (f"error: --json {afile / 'r.json'}: {afile} is a file, not a folder: choose a "
                                       "path whose folders are folders or do not exist yet\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "somefolder"]  # no .tmp left behind


def test_an_output_under_a_folder_this_user_cannot_write_is_refused_before_the_work(tmp_path: Path, monkeypatch) -> None:
    from torchtitan_like.errors import ConfigError
    from torchtitan_like.output_files import check_output_file

    check_output_file(tmp_path / "new" / "r.json", "--json r.json")  # (the nearest existing folder: tmp_path)
    # (Simulated: root, who runs this suite here, may write anywhere.)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=rf"^--json r.json: {tmp_path} is not writable by this user: choose a path"):
        check_output_file(tmp_path / "new" / "r.json", "--json r.json")


def test_atomic_write_creates_folders_and_leaves_no_temp_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    from torchtitan_like.output_files import write_text_atomically
    from torchtitan_like.errors import ConfigError

    out = tmp_path / "new" / "r.json"
    write_text_atomically(out, '{"a": 1}\n', "--json r.json")
    assert json.loads(out.read_text()) == {"a": 1} and os.listdir(out.parent) == ["r.json"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError, match=r"^--json r.json: cannot write it \(No space left on device\)"):
        write_text_atomically(out, "{}\n", "--json r.json")
    assert json.loads(out.read_text()) == {"a": 1} and os.listdir(out.parent) == ["r.json"]


@pytest.mark.parametrize("flag, suffix", [("--out", "x.toml"), ("--json", "x.json")])
def test_plan_output_under_a_file_or_onto_a_folder_is_one_line(tmp_path: Path, capsys, flag, suffix) -> None:
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    afile = tmp_path / "afile"
    afile.write_text("x")
    common = ["--model", "llama3:debugmodel", "--ngpu", "1", "--seq-len", "256", "--global-batch", "2",
              "--no-verify"]
    assert plan.main([*common, flag, str(afile / suffix)]) == 2
    assert capsys.readouterr().err == (f"error: {flag} {afile / suffix}: {afile} is a file, not a folder: choose a "
                                       "path whose folders are folders or do not exist yet\n")
    assert plan.main([*common, flag, str(tmp_path)]) == 2
    example = "plan.toml" if flag == "--out" else "plan.json"
    assert capsys.readouterr().err == (f"error: {flag} {tmp_path} is a folder: name the file to write, "
                                       f"e.g. {tmp_path / example}\n")
