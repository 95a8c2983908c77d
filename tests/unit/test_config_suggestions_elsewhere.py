"""The "did you mean" of a key written under the wrong section names the same key in its own section.

config/loader.py promises an unknown key "raises ConfigError naming the key and the closest valid
name". When the key's own name exists verbatim in another section (torchtitan keeps seed and
warmup_steps elsewhere in some versions), that key is the suggestion (it once was an unrelated key
of the same section, e.g. training.seq_len for training.seed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torchtitan_like.config.loader import load_config
from torchtitan_like.errors import ConfigError


def _error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def test_cli_key_in_the_wrong_section_suggests_the_same_name_elsewhere() -> None:
    msg = _error(["--training.seed", "1"])
    assert "did you mean 'debug.seed'" in msg, msg


def test_toml_key_in_the_wrong_section_suggests_the_same_name_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[training]\nwarmup_steps = 10\n", encoding="utf-8")
    msg = _error(["--job.config_file", str(path)])
    assert "did you mean 'lr_scheduler.warmup_steps'" in msg, msg


def test_lr_under_training_suggests_optimizer_lr() -> None:
    msg = _error(["--training.lr", "3e-4"])
    assert "did you mean 'optimizer.lr'" in msg, msg


def test_a_name_found_in_several_sections_lists_them() -> None:
    msg = _error(["--training.enable"])
    assert "did you mean one of 'checkpoint.enable'" in msg and "'compile.enable'" in msg, msg


def test_a_misspelt_key_still_gets_the_closest_name() -> None:
    assert "did you mean 'training.steps'" in _error(["--training.stepz", "3"])
