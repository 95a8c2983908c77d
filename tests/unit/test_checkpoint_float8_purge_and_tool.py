"""Checkpoints, third look:

- a checkpoint saved with FSDP float8 all-gather holds plain tensors: it loads where torchao.float8 is
  not imported (a resume without float8, a bf16 fine-tune's initial_load_path, tools/checkpoint.py convert);
- keep_latest_k keeps the last full-state checkpoint behind a model-only final save;
- initial_load_model_only=false from a model-only checkpoint says what it lacks, and is refused with
  initial_load_in_hf;
- [checkpoint] save settings with checkpoint.enable=false, and export_dtype with no model-only or HF final
  save, are named at start;
- tools/checkpoint.py convert: an unreadable DCP without a manifest, or a failed DCP write, is one "error:"
  line with exit 2, and the failed write leaves no temporary folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoint import _one_thread, ckpt_dir, make_run, manager  # noqa: F401 (module-wide one-thread fixture)
from tests.distributed.harness import run_on_ranks
from torchtitan_like.components.checkpoint import CheckpointError
from torchtitan_like.components.manifest import complete_steps, read_manifest
from torchtitan_like.errors import ConfigError

from test_config_and_convert_edges import _tool_main  # loads tools/checkpoint.py

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "checkpoint.py"
BASE = ["--job.config_file", str(ROOT / "train_configs" / "debug_model.toml")]

# Saves without a process group: DCP says it assumes a single process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")



# --- float8 all-gather checkpoints ------------------------------------------------------------------


def _float8_fsdp_save(dump: str) -> dict:
    """Rank function (world 2): FSDP(2) with torchao float8 (emulated) and FSDP float8 all-gather, built in
    the trainer's order; save step 1; return the full weights."""
    import torch.distributed as dist
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from tests.distributed.tiny_loop import LoopSpec, full_params
    from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
    from torchtitan_like.config.schema import Checkpoint, Parallelism
    from torchtitan_like.distributed.parallel_dims import ParallelDims
    from torchtitan_like.models.llama3.model import Transformer
    from torchtitan_like.models.llama3.parallelize import parallelize_llama

    spec = LoopSpec(parallelism=Parallelism(data_parallel_shard_degree=2))
    args, training = spec.model_args(), spec.training()
    pd = ParallelDims.from_config(spec.parallelism, dist.get_world_size())
    pd.validate(model_args=args, training=training)
    pd.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(args)
    convert_to_float8_training(
        model,
        config=Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=True),
        module_filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "output" not in fqn,
    )
    parallelize_llama(model, pd, parallelism=spec.parallelism, training=training, device_type="cpu")
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(0)
    mgr = CheckpointManager(
        Checkpoint(enable=True, interval=1, keep_latest_k=0),
        dump_folder=dump,
        model_parts=[model],
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        lr_scheduler=None,
        dataloader=None,
        train_state=TrainState(step=1),
        fingerprint={"config_hash": "f8", "layout": {"dp_shard": 2}, "world_size": dist.get_world_size()},
        model_args=args,
    )
    mgr.maybe_save(1)
    mgr.close()
    return {"params": full_params(model), "n_layers": args.n_layers}


# A fresh interpreter (so torchao.float8, whose import allowlists its tensor subclass for torch.load, is
# not imported by another test): the run's weights into a plain model, as a resume without float8, an
# initial_load_path of a bf16 fine-tune or an evaluation job would.
_LOAD_PLAIN = """
import sys, warnings, torch
warnings.filterwarnings("ignore")
from dataclasses import replace
from torchtitan_like.components.checkpoint import CheckpointManager, TrainState
from torchtitan_like.config.schema import Checkpoint
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.models.llama3.model import Transformer
args = replace(LLAMA3_FLAVORS["debugmodel"], n_layers=int(sys.argv[2]), max_seq_len=16)
model = Transformer(args)
model.init_weights(7)
mgr = CheckpointManager(Checkpoint(enable=True), dump_folder=sys.argv[1], model_parts=[model],
                        optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None, dataloader=None,
                        train_state=TrainState(), fingerprint={}, model_args=args)
assert mgr.load() == 1
mgr.close()
torch.save(model.state_dict(), sys.argv[3])
"""


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else stderr.strip()[-400:])[:400]


def test_a_checkpoint_saved_with_fsdp_float8_all_gather_loads_without_float8(tmp_path):
    import subprocess

    dump = tmp_path / "dump"
    saved = run_on_ranks(_float8_fsdp_save, world_size=2, tmp_path=tmp_path, args=(str(dump),), timeout_s=120)[0]
    out = tmp_path / "loaded.pt"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", _LOAD_PLAIN, str(dump), str(saved["n_layers"]), str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, _error_line(r.stderr)
    got = torch.load(out)
    for k, w in saved["params"].items():
        assert torch.equal(got[k], w.float()), k

    # The tool, as users convert a run's weights for inference.
    r = subprocess.run([sys.executable, str(TOOL), "convert", str(dump / "checkpoint" / "step-1"),
                        str(tmp_path / "w.pt"), "--model-only"], capture_output=True, text=True, timeout=120,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, _error_line(r.stderr)


# --- purge ----------------------------------------------------------------------------------------


def test_keep_latest_k_keeps_the_last_full_state_behind_a_model_only_final_save(tmp_path):
    run = make_run()
    mgr = manager(run, tmp_path, interval=2, keep_latest_k=1)
    for _ in range(5):
        run.step()
        mgr.maybe_save(run.state.step, last=run.state.step == 5)
    mgr.close()
    steps = {s: read_manifest(p).get("model_only") for s, p in complete_steps(ckpt_dir(tmp_path)).items()}
    assert steps.get(5) is True, steps  # the final export is there (not what this test is about)
    full = [s for s, model_only in steps.items() if not model_only]
    assert full == [4], f"the full state of step 4 was purged: {steps}"


# --- initial_load_model_only=false ----------------------------------------------------------------


def test_initial_full_load_of_a_model_only_checkpoint_says_what_it_lacks(tmp_path, caplog):
    first = make_run(0)
    mgr = manager(first, tmp_path / "first", interval=10)
    first.train(3, mgr)
    mgr.maybe_save(3, last=True)  # model only (last_save_model_only defaults to true)
    mgr.close()
    source = ckpt_dir(tmp_path / "first") / "step-3"
    assert read_manifest(source)["model_only"]

    other = make_run(1)
    m2 = manager(other, tmp_path / "second", initial_load_path=str(source), initial_load_model_only=False)
    with caplog.at_level(logging.WARNING, logger="torchtitan_like"):
        try:
            m2.load()
        except CheckpointError as e:  # refusing is a fix too
            assert "optimizer" in str(e)
            return
        finally:
            m2.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("optimizer" in w for w in warned), f"no warning that the optimizer state is missing: {warned}"


def test_a_full_state_initial_load_from_hugging_face_is_refused():
    from torchtitan_like.config.loader import load_config

    with pytest.raises(ConfigError, match=r"initial_load_model_only"):
        load_config(BASE + [
            "--checkpoint.initial_load_path", "/hf/llama", "--checkpoint.initial_load_in_hf",
            "--checkpoint.no_initial_load_model_only",
        ])


# --- settings that do nothing ---------------------------------------------------------------------


def test_checkpoint_save_settings_without_checkpointing_are_named_at_start():
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings

    cfg = load_config(BASE + ["--checkpoint.interval", "7", "--checkpoint.keep_latest_k", "2"])
    assert not cfg.checkpoint.enable
    ignored = ignored_settings(cfg, pp=1)
    assert any("checkpoint.interval" in s for s in ignored), ignored
    assert any("checkpoint.keep_latest_k" in s for s in ignored), ignored


def test_export_dtype_with_no_export_is_named_at_start():
    from torchtitan_like.config.loader import load_config
    from torchtitan_like.config.validate import ignored_settings

    cfg = load_config(BASE + [
        "--checkpoint.enable", "--checkpoint.no_last_save_model_only", "--checkpoint.export_dtype", "bfloat16",
    ])
    ignored = ignored_settings(cfg, pp=1)
    assert any("checkpoint.export_dtype" in s for s in ignored), ignored


# --- tools/checkpoint.py convert errors -----------------------------------------------------------


def _saved_step(tmp_path: Path) -> Path:
    run = make_run()
    mgr = manager(run, tmp_path, interval=2)
    run.train(2, mgr)
    mgr.close()
    return ckpt_dir(tmp_path) / "step-2"


def test_convert_of_a_damaged_dcp_without_manifest_is_one_line_exit_2(tmp_path, capsys):
    src = _saved_step(tmp_path / "run")
    (src / "manifest.json").unlink()  # e.g. a checkpoint written by another DCP trainer
    data = sorted(src.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    main = _tool_main()
    try:
        rc = main(["convert", str(src), str(tmp_path / "out.pt")])
    except Exception as e:  # noqa: BLE001 (the bug: it escapes main)
        pytest.fail(f"main() raised {type(e).__name__}: {str(e)[:200]}")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[-1].startswith("error: ") and str(src) in err.splitlines()[-1]
    assert not (tmp_path / "out.pt").exists()


def test_a_failed_convert_into_a_dcp_folder_leaves_nothing_and_exits_2(tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model = make_run().model
    pt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), pt)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    out = tmp_path / "out" / "dcp"
    main = _tool_main()
    try:
        rc = main(["convert", str(pt), str(out)])
    except (Exception, BaseException) as e:  # noqa: BLE001 (the bug: it escapes main)
        rc = f"raised {type(e).__name__}"
    leftovers = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert rc == 2, rc
    assert capsys.readouterr().err.startswith("error: ")
    assert leftovers == [], f"left behind: {leftovers}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
