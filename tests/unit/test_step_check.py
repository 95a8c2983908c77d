"""The step check's rehearsal (torchtitan_like/step_check.py): which layout and config it trains, and
how a failed launch is reported. The launch itself is covered end to end by
tests/integration/test_step_check_run.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchtitan_like.config.loader import load_config, to_toml
from torchtitan_like.errors import ConfigError
from torchtitan_like.step_check import Rehearsal, rehearsal, resolved_layout, run_rehearsal
from torchtitan_like.trainer import check_job

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*args: str, config: str = "debug_model.toml"):
    return load_config(["--job.config_file", str(ROOT / "train_configs" / config), *args])


@pytest.mark.parametrize(
    ("config", "world"),
    [("llama3_8b.toml", 8), ("llama3_70b.toml", 64), ("llama3_405b.toml", 512)],
)
def test_shipped_configs_shrink_to_a_layout_the_trainer_accepts(config: str, world: int) -> None:
    cfg = _cfg(config=config)
    layout = resolved_layout(cfg, world)
    reh = rehearsal(cfg, layout)
    # Every degree the job uses is rehearsed at 2; the rest stay 1.
    assert reh.layout == {d: (2 if n > 1 else 1) for d, n in layout.items()}
    assert reh.cfg.model.flavor in ("debugmodel", "debugmodel_tied")
    # The trainer's own checks pass for the rehearsal at its rank count (no "the rehearsal is broken").
    checked = check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)
    assert (checked.parallel_dims.tp, checked.parallel_dims.dp_shard) == (reh.layout["tp"], reh.layout["dp_shard"])
    # The job's features are kept as it sets them.
    assert reh.cfg.activation_checkpoint == cfg.activation_checkpoint
    assert (reh.cfg.compile.enable, reh.cfg.compile.backend) == (cfg.compile.enable, cfg.compile.backend)
    assert reh.cfg.model.converters == cfg.model.converters
    assert reh.cfg.checkpoint.async_mode == cfg.checkpoint.async_mode


def _write(reh: Rehearsal) -> str:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    reh.cfg.job.dump_folder = str(folder / "run")
    path = folder / "config.toml"
    path.write_text(to_toml(reh.cfg))
    return str(path)


def test_405b_rehearsal_runs_the_jobs_features_on_cpu_with_its_own_files_and_folders() -> None:
    cfg = _cfg("--job.dump_folder", "/cluster/runs/405b", "--metrics.save_tb_folder", "/cluster/tb",
               "--comm.save_traces_folder", "/cluster/traces", "--checkpoint.folder", "/cluster/ckpt",
               "--checkpoint.initial_load_path", "/cluster/seed/step-0", "--checkpoint.keep_latest_k", "3",
               config="llama3_405b.toml")
    reh = rehearsal(cfg, resolved_layout(cfg, 512))
    c = reh.cfg
    assert reh.ranks == 4 and reh.layout["tp"] == 2 and reh.layout["dp_shard"] == 2
    assert (c.training.seq_len, c.training.dataset, c.training.dataset_path) == (64, "embedded", None)
    assert c.model.tokenizer_path == "" and c.model.flavor == "debugmodel"
    # Nothing the job owns is written or read: every folder is relative to the rehearsal's dump folder.
    assert (c.checkpoint.folder, c.metrics.save_tb_folder, c.comm.save_traces_folder) == ("checkpoint", "tb",
                                                                                          "comm_traces")
    assert c.checkpoint.initial_load_path is None and c.checkpoint.interval == 1
    assert c.checkpoint.keep_latest_k == 3  # the job's purge runs too
    # bf16 as on the job's GPUs; float8 casts and all-gathers run, the matmuls are emulated (and said so).
    assert c.training.mixed_precision_param == "bfloat16"
    assert c.quantize.linear.float8.emulate and c.quantize.linear.float8.enable_fsdp_float8_all_gather
    said = "; ".join(reh.not_rehearsed)
    assert "initial_load_path" in said and "emulated" in said and "tensor-parallel styles" in said
    assert "FSDP" in reh.features and "AC full" in reh.features
    # The job's config is not touched.
    assert cfg.training.seq_len == 8192 and cfg.checkpoint.folder == "/cluster/ckpt"


def test_five_dims_drop_replicate_then_shard_to_fit_the_rank_limit() -> None:
    cfg = _cfg("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "4",
               "--parallelism.context_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "2",
               "--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "2")
    layout = resolved_layout(cfg, 64)
    reh = rehearsal(cfg, layout, max_ranks=8)
    assert reh.layout == {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 2}
    assert "dp_replicate 2, dp_shard 4 (dropped to 1 to fit 8 ranks)" in reh.not_rehearsed
    assert "FSDP" in reh.features  # over cp
    assert rehearsal(cfg, layout, max_ranks=16).layout["dp_shard"] == 2
    assert rehearsal(cfg, layout, max_ranks=32).ranks == 32
    with pytest.raises(ConfigError, match="DRY_RUN_STEP_CHECK_RANKS=4"):
        rehearsal(cfg, layout, max_ranks=3)


def test_float8_settings_the_shrunk_layout_cannot_run_are_not_reported_as_the_jobs_failure() -> None:
    """Dropping dp_shard to fit the rank limit took FSDP away, which float8 all-gather needs: the launch then
    failed with the trainer's ConfigError and the step check said FAILED, the job "would likely fail the same
    way", of a job that passed the dry run. The rehearsal now leaves the all-gather out with a note; what it
    still cannot run on CPU is refused before any launch as the step check's own limit."""
    from torchtitan_like.step_check import _check_rehearsal

    f8 = ("--model.converters", "float8", "--quantize.linear.float8.enable_fsdp_float8_all_gather",
          "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp")
    cfg = _cfg("--parallelism.pipeline_parallel_degree", "4", "--parallelism.tensor_parallel_degree", "2",
               "--parallelism.data_parallel_shard_degree", "2", "--parallelism.pipeline_parallel_schedule",
               "ZBVZeroBubble", "--training.local_batch_size", "8", *f8)
    reh = rehearsal(cfg, resolved_layout(cfg, 16), max_ranks=4)
    assert reh.layout["dp_shard"] == 1 and reh.layout["cp"] == 1
    f8_reh = reh.cfg.quantize.linear.float8
    assert not f8_reh.enable_fsdp_float8_all_gather and not f8_reh.precompute_float8_dynamic_scale_for_fsdp
    assert "float8 FSDP all-gather (FSDP-only; FSDP was dropped to fit 4 ranks)" in reh.not_rehearsed
    _check_rehearsal(reh)  # the trainer accepts the rehearsal
    assert rehearsal(cfg, resolved_layout(cfg, 16), max_ranks=8).cfg.quantize.linear.float8.enable_fsdp_float8_all_gather

    # The float8 converter's own rules run there too: rowwise_with_gw_hp on a TP-only rehearsal passes them because
    # the rehearsal trains it in float32 (bf16 would be CPU autocast, which the recipe cannot run).
    gw_hp = _cfg("--parallelism.tensor_parallel_degree", "2", "--model.converters", "float8",
                 "--quantize.linear.float8.recipe_name", "rowwise_with_gw_hp")
    _check_rehearsal(rehearsal(gw_hp, resolved_layout(gw_hp, 2)))
    bf16 = rehearsal(gw_hp, resolved_layout(gw_hp, 2))
    bf16.cfg.training.mixed_precision_param = "bfloat16"
    with pytest.raises(ConfigError, match=r"step check: this job cannot be rehearsed .*rowwise_with_gw_hp"):
        _check_rehearsal(bf16)


def test_tied_flavor_accumulation_and_cuda_only_settings() -> None:
    cfg = _cfg("--model.flavor", "1B", "--training.local_batch_size", "2", "--training.global_batch_size", "64",
               "--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel",
               "--compile.enable", "--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem",
               "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "10")
    reh = rehearsal(cfg, resolved_layout(cfg, 4))
    c = reh.cfg
    assert c.model.flavor == "debugmodel_tied"
    # 64 = 2 x dp 2 x 16 microbatches: rehearsed with 2 of them.
    assert (c.training.local_batch_size, c.training.global_batch_size) == (2, 2 * 2 * 2)
    assert not c.parallelism.enable_async_tensor_parallel and c.checkpoint.async_mode == "async"
    assert c.activation_checkpoint.selective_ac_option == "6"
    said = "; ".join(reh.not_rehearsed)
    for what in ("gradient accumulation 16", "async tensor parallel", "pinned-memory", "every 10 blocks"):
        assert what in said, (what, said)
    check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)


def test_a_pipeline_split_for_the_jobs_depth_becomes_the_debug_models_even_split() -> None:
    cfg = _cfg("--model.flavor", "8B", "--parallelism.pipeline_parallel_degree", "4",
               "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
               "--parallelism.pipeline_parallel_layers_per_stage", "4", "--training.local_batch_size", "8",
               "--parallelism.pipeline_parallel_first_stage_less_layers", "0",
               "--parallelism.pipeline_parallel_last_stage_less_layers", "0")
    reh = rehearsal(cfg, resolved_layout(cfg, 8))
    p = reh.cfg.parallelism
    assert (p.pipeline_parallel_degree, p.pipeline_parallel_schedule) == (2, "Interleaved1F1B")
    assert p.pipeline_parallel_layers_per_stage is None and p.module_fqns_per_model_part is None
    assert (p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers) == (1, 1)
    assert any("pipeline_parallel_layers_per_stage" in n for n in reh.not_rehearsed)
    checked = check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)
    assert checked.pp_plan is not None and checked.pp_plan.stages_per_rank == 2


def test_a_failed_launch_names_the_error_and_keeps_the_log(tmp_path: Path) -> None:
    cfg = _cfg("--training.dataset", "synthetic", "--training.local_batch_size", "2")
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cpu")
    reh.cfg.debug.fail_at_step = 2  # (rehearsal() clears the job's; set here to make the launch fail)
    outcome = run_rehearsal(reh, tmp_path, timeout_s=300)
    assert not outcome.ok
    assert outcome.failure.startswith("train (steps 1..2) exited 1"), outcome.failure
    assert "debug.fail_at_step=2" in outcome.failure, outcome.failure
    log = (tmp_path / "step_check.log").read_text()
    assert re.search(r"step: +1 +loss", log), log[-2000:]  # (step 1 trained; the log is every rank's output)
    assert (tmp_path / "config.toml").is_file()


def test_a_launch_past_its_timeout_is_stopped_and_names_the_setting_that_allows_more(tmp_path: Path) -> None:
    cfg = _cfg("--training.dataset", "synthetic", "--training.local_batch_size", "2")
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cpu")
    outcome = run_rehearsal(reh, tmp_path, timeout_s=1)  # (torchrun alone takes longer to start)
    assert not outcome.ok and outcome.seconds < 60, outcome
    assert outcome.failure.startswith("train (steps 1..2) did not finish within 1 s"), outcome.failure
    assert "DRY_RUN_STEP_CHECK_TIMEOUT=S for run_train.sh, or --timeout S for python -m" in outcome.failure


@pytest.mark.usefixtures("restore_root_logger")  # (dry_run.main sets up logging)
def test_the_dry_runs_step_check_timeout_reaches_the_step_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchtitan_like.step_check as sc
    from torchtitan_like.dry_run import main as dry_run

    seen: list[dict] = []
    monkeypatch.setattr(sc, "step_check", lambda cfg, layout, **kw: seen.append(kw) or 0)
    base = ["--world-size", "1", "--device", "cpu", "--skip-files", "--step-check",
            "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml")]
    assert dry_run([*base, "--step-check-timeout", "3600"]) == 0
    assert dry_run(base) == 0
    assert [kw["timeout_s"] for kw in seen] == [3600, sc.DEFAULT_TIMEOUT_S], seen


def test_an_indexed_blend_jobs_rehearsal_reads_the_embedded_data_with_nothing_ignored() -> None:
    from torchtitan_like.config.validate import ignored_settings

    cfg = _cfg("--training.dataset", "indexed", "--training.dataset_path", "/data/web,/data/code",
               "--training.dataset_weights", "0.7,0.3", "--training.dataset_shuffle")
    c = rehearsal(cfg, resolved_layout(cfg, 1)).cfg
    assert (c.training.dataset, c.training.dataset_path, c.training.dataset_weights, c.training.dataset_shuffle) == (
        "embedded", None, [], False)
    assert not [s for s in ignored_settings(c, pp=1) if "dataset" in s]
    # A local job's record field: its rehearsal reads the embedded data, which has no records.
    local = _cfg("--training.dataset", "local", "--training.dataset_path", "/data/c.jsonl",
                 "--training.dataset_text_field", "body")
    assert not [s for s in ignored_settings(rehearsal(local, resolved_layout(local, 1)).cfg, pp=1) if "dataset" in s]


def test_flex_attention_is_rehearsed_with_sdpa_and_the_same_mask() -> None:
    cfg = _cfg("--model.attn_type", "flex", "--model.attn_mask_type", "block_causal",
               "--parallelism.tensor_parallel_degree", "2")
    reh = rehearsal(cfg, resolved_layout(cfg, 4))
    assert (reh.cfg.model.attn_type, reh.cfg.model.attn_mask_type) == ("sdpa", "block_causal")
    assert any("FlexAttention" in n and "dense document mask" in n for n in reh.not_rehearsed), reh.not_rehearsed
    check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)


def test_weight_decay_patterns_the_debug_model_lacks_are_left_out_with_a_note() -> None:
    cfg = _cfg("--optimizer.no_weight_decay_keywords", "*norm*,layers.20.*", config="llama3_8b.toml")
    reh = rehearsal(cfg, resolved_layout(cfg, 8))
    assert reh.cfg.optimizer.no_weight_decay_keywords == ["*norm*"]
    assert "optimizer.no_weight_decay_keywords ['layers.20.*'] (they name no parameter of debugmodel)" in reh.not_rehearsed
    assert cfg.optimizer.no_weight_decay_keywords == ["*norm*", "layers.20.*"], "the job's config is left as it was"
    load_config(["--job.config_file", _write(reh)])  # the rehearsal's config loads


def test_the_resume_launch_gets_the_whole_timeout_not_what_the_first_launch_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DRY_RUN_STEP_CHECK_TIMEOUT / --timeout is "seconds each of its launches may take" (README, --help): a
    # first launch that took most of it (a slow CPU compile) must not leave the resume a few seconds.
    import json
    import types

    import torchtitan_like.step_check as sc

    now = [0.0]
    given: list[float] = []

    def fake_launch(config: Path, ranks: int, log: Path, *, phase: str, timeout_s: float) -> tuple[int, str]:
        given.append(timeout_s)
        steps = load_config(["--job.config_file", str(config)]).training.steps
        metrics = tmp_path / "run" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text("".join(json.dumps({"step": s, "loss": 7.0}) + "\n" for s in range(1, steps + 1)))
        now[0] += 900.0  # each launch takes 900 s of the 1200 s allowed per launch
        return 0, ""

    monkeypatch.setattr(sc, "_launch", fake_launch)
    monkeypatch.setattr(sc, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cfg = _cfg("--training.dataset", "synthetic", "--training.local_batch_size", "2", "--checkpoint.enable")
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cpu")
    outcome = run_rehearsal(reh, tmp_path, timeout_s=1200)
    assert outcome.ok, outcome
    assert given == [1200, 1200], given


def test_float8_filter_names_of_blocks_the_debug_model_lacks_are_left_out_of_the_rehearsal() -> None:
    # "layers.20." keeps the 21st block of a 24-block job in high precision (the dry run accepts it); the debug
    # model has 6 blocks, and the trainer refuses a filter entry that matches no linear: the rehearsal would
    # fail at the build, reported as "the job would likely fail the same way".
    import torch

    from torchtitan_like.components.float8 import build_float8_converter
    from torchtitan_like.models import MODELS

    cfg = _cfg("--model.n_layers", "24", "--model.converters", "float8",
               "--quantize.linear.float8.filter_fqns", "output,layers.20.")
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cpu")
    f8 = reh.cfg.quantize.linear.float8
    assert f8.filter_fqns == ["output"], f8.filter_fqns
    assert any("filter_fqns ['layers.20.']" in n for n in reh.not_rehearsed), reh.not_rehearsed
    # The rehearsal's float8 conversion of the debug model goes through, as its ranks will run it.
    checked = check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)
    converter = build_float8_converter(reh.cfg.model.converters, f8, parallel_dims=checked.parallel_dims,
                                       device=torch.device("cpu"), param_dtype=torch.float32, check_device=False)
    with torch.device("meta"):
        model = MODELS["llama3"].build(checked.model_args)
    converter.convert(model)


def test_a_job_reading_its_tokenizer_from_hf_assets_path_is_rehearsed_with_the_embedded_one() -> None:
    # torchtitan's model.hf_assets_path names the tokenizer where model.tokenizer_path is unset: the rehearsal's
    # ranks, loading its config, must not resolve it back to the job's tokenizer (absent here with
    # DRY_RUN_SKIP_FILES=1; a 128k vocabulary against the debug model's 2000 where present).
    cfg = _cfg("--model.hf_assets_path", "/cluster/assets/Llama-3.1-8B")
    assert cfg.model.tokenizer_path == "/cluster/assets/Llama-3.1-8B"
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cpu")
    loaded = load_config(["--job.config_file", _write(reh)])
    assert (loaded.model.tokenizer_path, loaded.model.hf_assets_path) == ("", "")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gpu_jobs_rowwise_with_gw_hp_without_fsdp_is_rehearsed_in_float32(dtype: str) -> None:
    # On its GPUs the job trains under CUDA autocast, which rowwise_with_gw_hp supports; the trainer refuses it
    # under CPU autocast only. Rehearsed in bf16 on one CPU rank it failed at the build, reported as "the job
    # would likely fail the same way".
    import torch

    from torchtitan_like.components.float8 import build_float8_converter
    from torchtitan_like.distributed.utils import param_dtype

    cfg = _cfg("--model.converters", "float8", "--quantize.linear.float8.recipe_name", "rowwise_with_gw_hp",
               "--training.dtype", dtype)
    reh = rehearsal(cfg, resolved_layout(cfg, 1), device="cuda")
    t = reh.cfg.training
    assert (t.mixed_precision_param, t.dtype) == ("float32", "float32")
    assert any("rowwise_with_gw_hp cannot train under CPU autocast" in n for n in reh.not_rehearsed), reh.not_rehearsed
    loaded = load_config(["--job.config_file", _write(reh)])
    checked = check_job(loaded, reh.ranks)
    build_float8_converter(loaded.model.converters, loaded.quantize.linear.float8, parallel_dims=checked.parallel_dims,
                           device=torch.device("cpu"), param_dtype=param_dtype(loaded.training, "cpu"),
                           check_device=False)
    # With FSDP the job's bf16 is rehearsed as it is (FSDP casts the parameters: no autocast).
    sharded = rehearsal(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1}, device="cuda")
    assert sharded.cfg.training.mixed_precision_param == "bfloat16"


def test_a_schedule_the_cpu_ranks_cannot_run_is_said_to_be_the_step_checks_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.11 (the GPU machines' torch) sends between the two adjacent stages a V schedule puts on one rank,
    # which gloo cannot: the trainer refuses it on CPU only (check_schedule_backend). A CUDA job with such a
    # schedule passes its dry run; its CPU rehearsal must be refused as the step check's limit (exit 2) before
    # launching, not fail at the launch as "the job would likely fail the same way".
    from torch.distributed.pipelining import PipelineStage

    from torchtitan_like.step_check import _check_rehearsal

    if hasattr(PipelineStage, "_is_same_rank"):
        monkeypatch.delattr(PipelineStage, "_is_same_rank")  # as torch 2.11's
    cfg = _cfg("--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule",
               "ZBVZeroBubble", "--training.local_batch_size", "4")
    reh = rehearsal(cfg, resolved_layout(cfg, 2), device="cuda")
    with pytest.raises(ConfigError, match=r"step check: this job cannot be rehearsed on 2 CPU rank\(s\) \(pp 2\) .*"
                       r"'ZBVZeroBubble' on CPU \(gloo\) needs torch >= 2.12"):
        _check_rehearsal(reh)


def test_what_needs_fsdp_goes_with_fsdp_when_the_rank_limit_drops_it() -> None:
    # FSDP x TP on 2 ranks at most: the shard dim drops to 1, and the trainer refuses float8's FSDP all-gather
    # and CPU offload without FSDP. The launch then failed, reported as "the job would likely fail the same way".
    cfg = _cfg("--parallelism.tensor_parallel_degree", "2", "--model.converters", "float8",
               "--quantize.linear.float8.enable_fsdp_float8_all_gather",
               "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp", "--training.enable_cpu_offload")
    layout = resolved_layout(cfg, 4)
    assert layout["dp_shard"] == 2
    reh = rehearsal(cfg, layout, device="cpu", max_ranks=2)
    assert reh.layout["dp_shard"] == 1 and reh.layout["tp"] == 2
    f8 = reh.cfg.quantize.linear.float8
    assert not f8.enable_fsdp_float8_all_gather and not f8.precompute_float8_dynamic_scale_for_fsdp
    assert not reh.cfg.training.enable_cpu_offload
    assert any("float8 FSDP all-gather and CPU offload (FSDP-only; FSDP was dropped" in n for n in reh.not_rehearsed), reh.not_rehearsed
    # The rehearsal's config passes the trainer's checks and float8 converter on its 2 ranks.
    import torch

    from torchtitan_like.components.float8 import build_float8_converter

    loaded = load_config(["--job.config_file", _write(reh)])
    checked = check_job(loaded, reh.ranks)
    build_float8_converter(loaded.model.converters, loaded.quantize.linear.float8, parallel_dims=checked.parallel_dims,
                           device=torch.device("cpu"), check_device=False)
    # Within the limit, FSDP and what needs it are rehearsed as the job sets them.
    full = rehearsal(cfg, layout, device="cpu", max_ranks=8)
    assert full.cfg.quantize.linear.float8.enable_fsdp_float8_all_gather and full.cfg.training.enable_cpu_offload


@pytest.mark.usefixtures("restore_root_logger")  # (the mains set up logging)
@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("step_check", ["--world-size", "0"], "step check: --world-size 0 must be >= 1"),
        ("step_check", ["--world-size", "1", "--timeout", "-5"], "step check: --timeout -5 must be > 0 seconds"),
        ("dry_run", ["--world-size", "0"], "dry run: --world-size 0 must be >= 1"),
        ("dry_run", ["--world-size", "1", "--step-check", "--step-check-ranks", "0"],
         "--step-check-ranks 0 must be >= 1 (DRY_RUN_STEP_CHECK_RANKS"),
        ("dry_run", ["--world-size", "1", "--step-check", "--step-check-timeout", "0"],
         "--step-check-timeout 0 must be > 0 seconds (DRY_RUN_STEP_CHECK_TIMEOUT"),
    ],
    ids=["step-check-world-0", "step-check-timeout-negative", "dry-run-world-0", "ranks-0", "timeout-0"],
)
def test_a_bad_limit_on_the_command_line_is_one_error_line_and_exit_2(
    module: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --world-size 0 passed the step check (a 1-rank rehearsal), 0 for the dry run's step-check limits silently
    # became the defaults, and a negative --timeout failed the rehearsal (exit 1) as if the job would.
    import importlib

    import torchtitan_like.step_check as sc

    monkeypatch.setattr(sc, "run_rehearsal", lambda *a, **k: pytest.fail("launched a rehearsal"))
    main = importlib.import_module(f"torchtitan_like.{module}").main
    rc = main([*args, "--device", "cpu", "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err[-2000:]


class _InterruptedLaunch:
    """A torchrun launch that the user interrupts (Ctrl-C) while the step check waits for it."""

    def __init__(self, *args, **kwargs) -> None:
        self.pid, self.signals, self.waits = 0, [], 0

    def wait(self, timeout=None) -> int:
        self.waits += 1
        if self.waits == 1:
            raise KeyboardInterrupt
        return 75

    def send_signal(self, sig) -> None:
        self.signals.append(sig)


@pytest.mark.usefixtures("restore_root_logger")  # (dry_run.main sets up logging)
@pytest.mark.parametrize("entry", ["step_check", "dry_run"])
def test_ctrl_c_during_the_step_check_stops_its_ranks_removes_its_files_and_exits_130(
    entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Ctrl-C used to end in a KeyboardInterrupt traceback (exit by SIGINT), leaving the rehearsal's folder.
    import importlib
    import signal
    import subprocess
    import tempfile

    import torchtitan_like.step_check as sc

    launches: list[_InterruptedLaunch] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: launches.append(_InterruptedLaunch()) or launches[-1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["--world-size", "1", "--device", "cpu", "--job.config_file", str(ROOT / "train_configs" / "debug_model.toml")]
    if entry == "dry_run":
        args = ["--skip-files", "--step-check", *args]
    try:
        rc = importlib.import_module(f"torchtitan_like.{entry}").main(args)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped (a traceback for the user)")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 130 and errors == ["error: step check interrupted by SIGINT (Ctrl-C): its ranks were stopped and "
                                    "its files removed"], err[-2000:]
    assert "Traceback" not in err
    assert len(launches) == 1 and launches[0].signals == [signal.SIGTERM]  # (torchrun stops its workers)
    assert list(tmp_path.glob("torchtitan_like_step_check_*")) == [], list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (ignored only while stopping)


@pytest.mark.usefixtures("restore_root_logger")
def test_ctrl_c_during_the_dry_run_is_one_error_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchtitan_like.dry_run as dr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dr, "dry_run", interrupted)
    try:
        rc = dr.main(["--world-size", "1", "--device", "cpu", "--job.config_file",
                      str(ROOT / "train_configs" / "debug_model.toml")])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped (a traceback for the user)")
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "error: dry run interrupted by SIGINT (Ctrl-C): nothing was written"


SIGNALLED_STEP_CHECK = """
import os, signal, subprocess, sys
from torchtitan_like.step_check import main

class Launch:  # a torchrun launch; the step check gets SIGTERM/SIGHUP while it waits for it
    pid = 0
    def __init__(self, *args, **kwargs):
        self.waits = 0
    def wait(self, timeout=None):
        self.waits += 1
        if self.waits == 1:
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return 75
    def send_signal(self, sig):
        print("launch got", signal.Signals(sig).name, flush=True)

subprocess.Popen = Launch
sys.exit(main(["--world-size", "1", "--device", "cpu", "--job.config_file", sys.argv[2]]))
"""


@pytest.mark.parametrize("sig, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_during_the_step_check_stops_its_ranks_and_removes_its_files(tmp_path: Path, sig: str,
                                                                                       status: int) -> None:
    # Their default action ended the step check at once: its launch (a session of its own) trained on, orphaned,
    # and its folder stayed in the temp directory. (In a subprocess: the signal is real.)
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SIGNALLED_STEP_CHECK, sig, str(ROOT / "train_configs" / "debug_model.toml")],
                       env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert (r.returncode, errors) == (status, [f"error: step check stopped by {sig}: its ranks were stopped and "
                                               "its files removed"]), r.stderr[-2000:]
    assert [line for line in r.stdout.splitlines() if line.startswith("launch got")] == ["launch got SIGTERM"], \
        r.stdout  # (torchrun stops its workers)
    assert list(tmp_path.glob("torchtitan_like_step_check_*")) == [], list(tmp_path.iterdir())


def test_the_jobs_injected_faults_are_not_rehearsed() -> None:
    """debug.hang_at_step blocked a rehearsal rank until the step-check timeout (then 'FAILED ... a hang'), and its
    hang_rank, beyond the shrunk world, was refused as the step check's limit; fail_at_step was already cleared."""
    cfg = _cfg("--debug.fail_at_step", "2", "--debug.fail_rank", "7", "--debug.hang_at_step", "1",
               "--debug.hang_rank", "7")
    reh = rehearsal(cfg, resolved_layout(cfg, 8), max_ranks=4)
    assert (reh.cfg.debug.fail_at_step, reh.cfg.debug.hang_at_step) == (0, 0)
    check_job(load_config(["--job.config_file", _write(reh)]), reh.ranks)  # (hang_rank=7 of 4 ranks: not refused)
