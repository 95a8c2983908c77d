"""optimizer.no_weight_decay_keywords: the parameters its glob patterns name (by checkpoint name, whatever
wraps the blocks) train without weight decay, the others with optimizer.weight_decay; a pattern that
names nothing is refused; a resume applies the config's groups. The layouts' parity with one process is in
tests/distributed/test_no_weight_decay_parity.py."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from feature_runs import argv
from torchtitan_like.components.optimizer import check_no_weight_decay, param_groups
from torchtitan_like.config.loader import load_config
from torchtitan_like.config.schema import ActivationCheckpoint, Optimizer
from torchtitan_like.distributed.activation_checkpoint import apply_ac
from torchtitan_like.distributed.compile import apply_compile
from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import LLAMA3_FLAVORS
from torchtitan_like.models.llama3.model import Transformer
from torchtitan_like.trainer import Trainer

PATTERNS = ["*norm*", "tok_embeddings.*"]


def _meta_model(n_layers: int = 3) -> Transformer:
    with torch.device("meta"):
        return Transformer(replace(LLAMA3_FLAVORS["debugmodel"], n_layers=n_layers))


def _expected_no_decay(name: str) -> bool:
    return name.endswith("norm.weight") or name == "tok_embeddings.weight"


@pytest.mark.parametrize("wrap", ["none", "checkpoint", "compile", "checkpoint+compile"])
def test_groups_follow_checkpoint_names_through_block_wrappers(wrap: str) -> None:
    model = _meta_model()
    names = {id(p): n for n, p in model.named_parameters()}  # before wrapping: the checkpoint names
    if "checkpoint" in wrap:
        apply_ac(model, ActivationCheckpoint(mode="full"))
    if "compile" in wrap:  # (wrapping only: nothing compiles until a forward)
        apply_compile(model, backend="eager", under_checkpoints="checkpoint" in wrap)
    wrapped = [n for n, _ in model.named_parameters()]
    if wrap in ("checkpoint", "compile"):
        assert any("_checkpoint_wrapped_module" in n or "_orig_mod" in n for n in wrapped), wrapped[:3]
    decay, no_decay = param_groups([model], Optimizer(weight_decay=0.1, no_weight_decay_keywords=PATTERNS))
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n in names.values() if _expected_no_decay(n))
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(n for n in names.values() if not _expected_no_decay(n))


def test_no_keywords_is_one_group_and_an_empty_group_is_left_out() -> None:
    model = _meta_model()
    (only,) = param_groups([model], Optimizer())
    assert len(only["params"]) == len(list(model.parameters()))
    (no_decay,) = param_groups([model], Optimizer(no_weight_decay_keywords=["*"]))
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == len(list(model.parameters()))


def test_a_pattern_that_names_no_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"optimizer.no_weight_decay_keywords pattern '\*nrom\*' matches no "
                                          r"parameter of the model: parameter names look like tok_embeddings.weight"):
        check_no_weight_decay(Optimizer(no_weight_decay_keywords=["*norm*", "*nrom*"]), _meta_model())
    # A substring is not a glob: "norm" alone names no parameter.
    with pytest.raises(ConfigError, match="'norm' matches no parameter"):
        check_no_weight_decay(Optimizer(no_weight_decay_keywords=["norm"]), _meta_model())


def test_the_start_up_line_counts_what_decays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchtitan_like.components.optimizer"):
        check_no_weight_decay(Optimizer(weight_decay=0.1, no_weight_decay_keywords=["*norm*"]), _meta_model(3))
    # 3 blocks x 2 norms + the final norm, of 3 x 9 + 3 parameters.
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("optimizer: no weight decay on 7 of 30 parameters (")
    assert line.endswith("matching optimizer.no_weight_decay_keywords=['*norm*']; weight_decay=0.1 on the rest")


def _one_step(dump: Path, *overrides: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Weights before and after one training step, and that step's lr."""
    trainer = Trainer(load_config(argv(dump, "--training.steps", "1", "--optimizer.implementation", "for-loop",
                                       *overrides)))
    try:
        before = {n: p.detach().clone() for n, p in trainer.model_parts[0].named_parameters()}
        trainer.train()
        after = {n: p.detach().clone() for n, p in trainer.model_parts[0].named_parameters()}
    finally:
        trainer.close()
    return before, after, trainer.history[0]["lr"]


def test_one_step_decays_exactly_the_parameters_not_named(tmp_path: Path) -> None:
    """AdamW's first step is p (1 - lr wd) - lr u, with u from the gradient alone: against the same step
    with weight_decay 0, a decayed weight differs by -lr wd p and an excluded one not at all."""
    wd = 0.5
    p0, with_groups, lr = _one_step(tmp_path / "groups", "--optimizer.weight_decay", str(wd),
                                    "--optimizer.no_weight_decay_keywords", ",".join(PATTERNS))
    _, no_decay, lr0 = _one_step(tmp_path / "none", "--optimizer.weight_decay", "0")
    assert lr == lr0 > 0
    assert len([n for n in p0 if _expected_no_decay(n)]) == 6  # 2 blocks x 2 norms, the final norm, the embedding
    for name, start in p0.items():
        if _expected_no_decay(name):
            torch.testing.assert_close(with_groups[name], no_decay[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(with_groups[name] - no_decay[name], -lr * wd * start, rtol=1e-3, atol=1e-9,
                                       msg=name)


def test_a_resume_trains_with_the_configured_groups(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint saved without keywords, resumed with them (and back): the groups' weight decay is the
    config's, and the warning names the change."""
    dump = tmp_path / "run"
    common = ("--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.no_last_save_model_only",
              "--optimizer.weight_decay", "0.1")
    assert _train_to(dump, 2, *common).step == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchtitan_like.trainer"):
        resumed = _train_to(dump, 4, *common, "--optimizer.no_weight_decay_keywords", "*norm*")
    assert resumed.history[0]["step"] == 3, "it resumed from step 2"
    (opt,) = resumed.optimizers
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [16, 5]
    assert any("resumed with this config's optimizer settings" in r.getMessage() and "weight_decay 0.1 -> 0.0"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    back = _train_to(dump, 6, *common)
    assert back.history[0]["step"] == 5
    assert [g["weight_decay"] for g in back.optimizers[0].param_groups] == [0.1]


def _train_to(dump: Path, steps: int, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(argv(dump, "--training.steps", str(steps), *overrides)))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer
