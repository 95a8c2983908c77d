"""Is what README.md (and docs/planner.md) says true of the code?

Mechanical checks of doc facts (paths cited, keys named, commands written, exit codes, flavors) and
that `python -m torchtitan_like.train --help` stays torch-free, as the README's key listing needs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PLANNER_MD = (ROOT / "docs" / "planner.md").read_text(encoding="utf-8")
RESULTS_MD = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
# The generated reference is checked by tools/config_reference.py --check; the prose is what is checked here.
README_PROSE = README.split("<!-- config-reference:begin")[0]


def _code_block_commands(text: str) -> list[str]:
    """Each command of the fenced code blocks (continuation lines joined, comments dropped)."""
    out: list[str] = []
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


# ---------------------------------------------------------------------------------------------
# Guards that keep the doc honest as the code moves
# ---------------------------------------------------------------------------------------------


def test_every_test_file_the_docs_cite_exists():
    cited = set()
    for text in (README, PLANNER_MD, RESULTS_MD):
        cited |= set(re.findall(r"\b(test_[a-z0-9_]+\.py)\b", text))
        cited |= {p.rpartition("/")[2] for p in re.findall(r"\btests/[a-z_/]+\.py\b", text)}
    assert cited, "the docs cite no test file: the regex is broken"
    existing = {p.name for p in (ROOT / "tests").rglob("*.py")}  # (conftest.py, harness modules too)
    assert not cited - existing, f"docs cite test files that do not exist: {sorted(cited - existing)}"


def test_every_dotted_config_key_in_the_readme_prose_exists():
    from torchtitan_like.config.fields import keys, sections

    known_keys, known_sections = set(keys()), set(sections())
    roots = {s.split(".")[0] for s in known_sections}
    named = set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)+)(?: ?=[^`]*)?`", README_PROSE))
    named |= set(re.findall(r"--([a-z_0-9]+(?:\.[a-z_0-9]+)+)", README_PROSE))
    config_like = {n for n in named if n.split(".")[0] in roots and n not in ("metrics.jsonl", "metrics.dropped.jsonl")}
    assert len(config_like) > 20, sorted(config_like)
    unknown = sorted(n for n in config_like if n not in known_keys and n not in known_sections)
    assert not unknown, f"README names config keys the schema does not have: {unknown}"


# ---------------------------------------------------------------------------------------------
# Code bug: --help is documented as torch-free, but the exit path imports torch
# ---------------------------------------------------------------------------------------------


def test_train_help_runs_without_torch():
    # README: `python -m torchtitan_like.train --help` prints every key; train.py says "--help stays
    # torch-free". Block torch and run the module as `python -m` does.
    # A Python without torch: a finder that refuses it (sys.modules stays free of a 'torch' entry).
    code = (
        "import sys, runpy\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = ['torchtitan_like.train', '--help']\n"
        "runpy.run_module('torchtitan_like.train', run_name='__main__', alter_sys=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--training.steps" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Doc bugs
# ---------------------------------------------------------------------------------------------


def _runs_with_the_venv(script: Path) -> bool:
    """A script run through its shebang finds the checkout's .venv itself (as run_train.sh does)."""
    head = "\n".join(script.read_text(encoding="utf-8").splitlines()[:60])
    return not head.startswith("#!/usr/bin/env python") or ".venv" in head


def test_readme_commands_run_this_checkouts_python_code_with_the_venv():
    # After `tools/setup.sh` the package and torch are in .venv only (run_train.sh picks it up itself);
    # a bare `python`/`python3`, or a `#!/usr/bin/env python3` script, is whatever the shell has.
    bad = []
    for cmd in _code_block_commands(README):
        for part in re.split(r"&&|;|\|\|?", cmd):
            try:
                words = shlex.split(part)
            except ValueError:  # a quote split by the `;` / `|` cut (e.g. a ';'-separated override value)
                words = part.split()
            tokens = [t for t in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", t)]
            if not tokens:
                continue
            first = tokens[0]
            if re.fullmatch(r"(tools|benchmarks)/\S+\.py", first) and not _runs_with_the_venv(ROOT / first):
                bad.append(part.strip())
            elif first in ("python", "python3") and len(tokens) > 1 and (
                re.fullmatch(r"(tools|benchmarks)/\S+\.py", tokens[1])
                # `--help` of the trainer is meant to be torch-free (see test_train_help_runs_without_torch)
                or (tokens[1] == "-m" and len(tokens) > 2 and tokens[2].startswith("torchtitan_like")
                    and "--help" not in tokens)
            ):
                bad.append(part.strip())
    assert not bad, "README commands that need an activated venv (write .venv/bin/python ...):\n" + "\n".join(bad)


def test_planner_md_dry_run_says_it_checks_the_files():
    bullet = PLANNER_MD.split("- **Dry run**", 1)[1].split("- **Planner**", 1)[0]
    skips = [s for s in re.split(r"(?<=\.)\s", bullet) if "skip" in s.lower() and "DRY_RUN_SKIP_FILES" not in s]
    assert not any("tokenizer" in s or "dataset" in s for s in skips), skips
    assert "DRY_RUN_SKIP_FILES" in bullet


def test_readme_exit_75_row_says_a_checkpoint_needs_checkpoint_enable():
    from torchtitan_like.config.schema import JobConfig

    # The premise: checkpoints are off unless asked for, in the schema and in the default config.
    assert JobConfig().checkpoint.enable is False
    assert "[checkpoint]" not in (ROOT / "train_configs" / "debug_model.toml").read_text()
    row = next(line for line in README.splitlines() if line.startswith("| 75 |"))
    assert "checkpoint.enable" in row or "enable = true" in row, row


def test_readme_tests_section_matches_what_tests_unit_does():
    section = README.split("## Tests", 1)[1]
    if "`tests/unit` (no process group)" not in section:
        return
    multi = sorted(p.name for p in (ROOT / "tests" / "unit").glob("test_*.py")
                   if p.name != Path(__file__).name and "run_on_ranks" in p.read_text(encoding="utf-8"))
    assert not multi, f"README: tests/unit has no process group, but these start gloo ranks: {multi}"


def test_model_flavor_doc_names_every_registered_flavor():
    from torchtitan_like.config.fields import keys
    from torchtitan_like.models import MODELS

    doc = keys()["model.flavor"].doc
    missing = [f for f in MODELS["llama3"].flavors if not re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", doc)]
    assert not missing, f"model.flavor doc {doc!r} does not name {missing}"
