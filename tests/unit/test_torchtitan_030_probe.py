"""benchmarks/torchtitan_030_probe.py, which tells whether torchtitan 0.3.0 runs on a machine, and the GPU
session step that installs it apart from 0.2.2 and runs the probe.

torchtitan is not installed here: stand-in packages play a 0.3.0 that does not import and one that
imports but cannot build its model; the probe must report each answer, not crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_session  # noqa: E402

PROBE = ROOT / "benchmarks" / "torchtitan_030_probe.py"


def _probe(site: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    r = subprocess.run([sys.executable, str(PROBE), "--site", str(site), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return r, json.loads(out.read_text()) if out.exists() else {}


def _stand_in(tmp_path: Path, train_py: str) -> Path:
    """A site holding a stand-in torchtitan 0.3.0 whose torchtitan.train runs `train_py`."""
    pkg = tmp_path / "site" / "torchtitan"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.3.0"\n')
    (pkg / "train.py").write_text(train_py)
    return pkg.parent


def test_a_site_without_torchtitan_is_reported(tmp_path):
    r, result = _probe(tmp_path / "empty", tmp_path / "probe.json")
    assert r.returncode == 0, r.stderr
    assert result["imports"] is False and "no torchtitan package in" in result["error"]
    assert "does not run: no torchtitan package" in r.stdout


def test_a_torchtitan_that_does_not_import_is_reported_with_its_error(tmp_path):
    site = _stand_in(tmp_path, 'raise ImportError("cannot import name spmd_thing from torch (nightly only)")\n')
    r, result = _probe(site, tmp_path / "probe.json")
    assert r.returncode == 0, r.stderr
    assert result["imports"] is False
    assert result["error"] == "ImportError: cannot import name spmd_thing from torch (nightly only)"
    assert "does not run: ImportError" in r.stdout


def test_a_torchtitan_that_imports_but_cannot_build_its_model_is_reported(tmp_path):
    site = _stand_in(tmp_path, "")
    r, result = _probe(site, tmp_path / "probe.json")
    assert r.returncode == 0, r.stderr
    assert result["imports"] is True and result["torchtitan"] == "0.3.0"
    assert result["torchtitan_file"].startswith(str(tmp_path / "site"))
    assert result["builds"] is False and result["error"].startswith("ModuleNotFoundError")
    # Asked before the build; here it could not be asked, which is not a "no".
    assert result["sdpa_attention"] is None and result["sdpa_check"].startswith("ModuleNotFoundError")
    assert "takes no SDPA" not in r.stdout


def test_the_session_step_installs_0_3_0_apart_and_probes_it(tmp_path, monkeypatch):
    ctx = gpu_session.Context(out=tmp_path / "work", peer_site="/tmp/site", smoke=False)
    monkeypatch.setattr(gpu_session, "ROOT", tmp_path)
    (probe_only,) = gpu_session._torchtitan_030(ctx)  # no wheels fetched: the probe says so
    assert probe_only[probe_only.index("--site") + 1] == gpu_session.PEER030_SITE
    wheels = tmp_path / ".whl" / "peer030"
    wheels.mkdir(parents=True)
    (wheels / "torchtitan-0.3.0-py3-none-any.whl").write_bytes(b"")
    install, probe = gpu_session._torchtitan_030(ctx)
    assert install[install.index("--target") + 1] == gpu_session.PEER030_SITE != "/tmp/site"
    assert install[-1].endswith("torchtitan-0.3.0-py3-none-any.whl") and "--no-index" in install
    assert probe[1].endswith("torchtitan_030_probe.py")
    names = [s.name for s in gpu_session.STEPS]
    # Last: on CPU with the GPU machine's torch (2.11.0+cu130) 0.3.0 does not import; the GPU can only confirm it.
    assert names[-1] == "torchtitan_030"
