"""Config loading: TOML + `extends`, command-line overrides, strict errors, round trip, docs, README.

Every user-facing ConfigError is triggered here and its message checked for the key, the file (and
line where TOML reports one) and the fix or the closest valid name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from torchtitan_like.config.fields import Key, keys, literal_choices, sections, unwrap_optional
from torchtitan_like.config.loader import coerce, load_config, to_toml
from torchtitan_like.config.reference import README_BEGIN, README_END, markdown_reference
from torchtitan_like.config.schema import JobConfig
from torchtitan_like.config.validate import validate
from torchtitan_like.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_file(path: Path, *overrides: str) -> JobConfig:
    return load_config(["--job.config_file", str(path), *overrides])


def config_error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    msg = str(info.value)
    assert "\n" not in msg, f"a config error is one line: {msg!r}"
    return msg


def cli_text(value: Any) -> str:
    """How a user types `value` on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Loading and precedence
# ---------------------------------------------------------------------------------------------


def test_no_arguments_gives_the_defaults() -> None:
    assert load_config([]) == JobConfig()


def test_toml_file_sets_keys_and_leaves_the_rest_at_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", '[training]\nsteps = 7\n\n[optimizer]\nlr = 1e-3\nname = "Adam"\n')
    cfg = load_file(path)
    assert (cfg.training.steps, cfg.optimizer.lr, cfg.optimizer.name) == (7, 1e-3, "Adam")
    assert cfg.training.seq_len == JobConfig().training.seq_len
    assert cfg.job.config_file == str(path)


def test_the_shipped_debug_config_loads() -> None:
    cfg = load_file(REPO / "train_configs" / "debug_model.toml")
    assert cfg.model.flavor == "debugmodel"


@pytest.mark.parametrize("argv", [["--training.steps", "9"], ["--training.steps=9"]])
def test_cli_value_after_a_space_or_an_equals_sign(argv: list[str]) -> None:
    assert load_config(argv).training.steps == 9


def test_cli_parses_each_type() -> None:
    cfg = load_config(
        ["--optimizer.lr", "1e-3", "--training.max_norm=2", "--training.global_batch_size", "-1",
         "--job.description", "hello world", "--optimizer.implementation", "foreach", "--training.local_batch_size", "4"]
    )
    assert cfg.optimizer.lr == 1e-3
    # An integer typed for a float key becomes a float (the dataclass says float).
    assert cfg.training.max_norm == 2.0 and isinstance(cfg.training.max_norm, float)
    # A negative number is a value, not the next option.
    assert cfg.training.global_batch_size == -1
    assert cfg.job.description == "hello world"
    assert cfg.optimizer.implementation == "foreach"
    assert cfg.training.local_batch_size == 4


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", "[training]\nsteps = 7\nseq_len = 128\n")
    defaults = JobConfig()
    # The override comes before --job.config_file: position on the command line does not matter.
    cfg = load_config(["--training.steps", "9", "--job.config_file", str(path)])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.seq_len == 128  # TOML beats default
    assert cfg.training.local_batch_size == defaults.training.local_batch_size  # default
    assert defaults.training.steps not in (7, 9) and defaults.training.seq_len != 128


def test_the_last_cli_occurrence_wins() -> None:
    assert load_config(["--training.steps", "3", "--training.steps=4"]).training.steps == 4


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--debug.deterministic"], True),
        (["--debug.deterministic", "--debug.seed", "5"], True),  # a flag does not swallow the next option
        (["--debug.deterministic=true"], True),
        (["--debug.deterministic", "true"], True),
        (["--debug.deterministic", "--debug.no_deterministic"], False),
        (["--debug.deterministic", "--debug.deterministic=false"], False),
        (["--debug.deterministic", "--debug.deterministic", "false"], False),
        (["--debug.deterministic", "--debug.no_deterministic=true"], False),
        (["--debug.no_deterministic=false"], True),
        (["--debug.no_deterministic", "false"], True),
    ],
)
def test_cli_booleans(argv: list[str], expected: bool) -> None:
    assert load_config(argv).debug.deterministic is expected


@pytest.mark.parametrize("argv", [["--debug.deterministic=maybe"], ["--debug.no_deterministic=maybe"]])
def test_cli_boolean_rejects_other_words(argv: list[str]) -> None:
    msg = config_error(argv)
    assert "debug" in msg and "deterministic" in msg and "'maybe'" in msg and "true or false" in msg


@pytest.mark.parametrize("dotted", ["lr_scheduler.decay_ratio", "model.max_seq_len", "training.dataset_path"])
@pytest.mark.parametrize("word", ["none", "None", "null"])
def test_optional_keys_accept_none_on_the_cli(dotted: str, word: str, tmp_path: Path) -> None:
    section, name = dotted.split(".")
    value = {"decay_ratio": "0.5", "max_seq_len": "4096", "dataset_path": '"data.txt"'}[name]
    path = write(tmp_path / "job.toml", f"[{section}]\n{name} = {value}\n")
    assert getattr(getattr(load_file(path), section), name) is not None
    assert getattr(getattr(load_file(path, f"--{dotted}", word), section), name) is None


def test_none_is_not_accepted_for_a_required_key() -> None:
    msg = config_error(["--training.steps", "none"])
    assert "--training.steps must be an integer, got 'none'" in msg


# ---------------------------------------------------------------------------------------------
# Lists (tested on synthetic keys: the schema need not have one)
# ---------------------------------------------------------------------------------------------

STR_LIST = Key("training", "names", list[str], [], "A synthetic list key.")
INT_LIST = Key("training", "sizes", list[int], [], "A synthetic list key.")


@pytest.mark.parametrize(
    "raw, expected",
    [("a,b,c", ["a", "b", "c"]), ("a, b ,c", ["a", "b", "c"]), ("single", ["single"]), ("", [])],
)
def test_cli_list_is_comma_separated(raw: str, expected: list[str]) -> None:
    assert coerce(STR_LIST, raw, from_cli=True) == expected


def test_cli_list_items_are_parsed_to_the_item_type() -> None:
    assert coerce(INT_LIST, "1,2,3", from_cli=True) == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"--training\.sizes must be an integer, got 'x'"):
        coerce(INT_LIST, "1,x", from_cli=True)


@pytest.mark.parametrize(
    "raw, expected", [("[]", []), ('["a", "b"]', ["a", "b"]), (" ['a'] ", ["a"])],
)
def test_cli_list_may_be_written_as_in_toml(raw: str, expected: list[str]) -> None:
    # '[]' used to become the one-item list ['[]'] (a filter_fqns entry matching nothing).
    assert coerce(STR_LIST, raw, from_cli=True) == expected
    assert coerce(INT_LIST, "[1, 2]", from_cli=True) == [1, 2]
    with pytest.raises(ConfigError, match=r"--training\.names='\[a\]' is not a TOML array: write it as in the TOML"):
        coerce(STR_LIST, "[a]", from_cli=True)
    with pytest.raises(ConfigError, match=r"--training\.sizes must be an integer, got 'x'"):
        coerce(INT_LIST, '[1, "x"]', from_cli=True)


def test_toml_list_is_checked() -> None:
    assert coerce(STR_LIST, ["a", "b"], from_cli=False) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"training\.names must be a list of str, got 'a'"):
        coerce(STR_LIST, "a", from_cli=False)
    with pytest.raises(ConfigError, match=r"training\.sizes must be an integer, got 'b'"):
        coerce(INT_LIST, [1, "b"], from_cli=False)


def test_schema_list_keys_load_from_cli_and_toml(tmp_path: Path) -> None:
    list_keys = [k for k in keys().values() if get_origin(unwrap_optional(k.type)[0]) is list]
    if not list_keys:
        pytest.skip("the schema has no list key yet (lists are covered by the synthetic-key tests)")
    for k in list_keys:
        section, name = k.section, k.name
        item = get_args(unwrap_optional(k.type)[0])[0]
        if get_origin(item) is list:
            # A list of lists: ';' separates the outer items on the command line.
            obj = load_config([f"--{k.dotted}", "a,b;c"])
            for part in section.split("."):
                obj = getattr(obj, part)
            assert getattr(obj, name) == [["a", "b"], ["c"]]
            continue
        # A list of choices (list[Literal[...]]) takes one of them; cross-key rules may refuse pairs.
        choices = literal_choices(item)
        values = ["a", "b"] if choices is None else [str(choices[-1])]
        if item is float:  # (training.dataset_weights)
            values = ["0.5", "0.25"]
        obj = load_config([f"--{k.dotted}", ",".join(values)])
        for part in section.split("."):
            obj = getattr(obj, part)
        assert getattr(obj, name) == ([float(v) for v in values] if item is float else values)


# ---------------------------------------------------------------------------------------------
# extends
# ---------------------------------------------------------------------------------------------


def test_extends_is_relative_to_the_child_and_multi_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "base" / "base.toml", "[training]\nsteps = 7\nseq_len = 128\nlocal_batch_size = 2\n\n[optimizer]\nlr = 1e-3\n")
    write(tmp_path / "mid" / "mid.toml", 'extends = "../base/base.toml"\n[training]\nseq_len = 256\n')
    child = write(tmp_path / "child" / "child.toml", 'extends = "../mid/mid.toml"\n[training]\nsteps = 9\n')
    monkeypatch.chdir(tmp_path / "base")  # relative to the child file, not to the working directory
    cfg = load_file(child)
    assert cfg.training.steps == 9  # child overrides base
    assert cfg.training.seq_len == 256  # mid overrides base
    # Key by key: the rest of base's [training] and [optimizer] survive.
    assert cfg.training.local_batch_size == 2
    assert cfg.optimizer.lr == 1e-3


def test_cli_overrides_an_inherited_key(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", "[training]\nsteps = 7\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n')
    assert load_file(child).training.steps == 7
    assert load_file(child, "--training.steps", "3").training.steps == 3


def test_extends_cycle_names_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    msg = config_error(["--job.config_file", str(a)])
    assert "cycle" in msg
    assert f"{a.resolve()} -> {b.resolve()} -> {a.resolve()}" in msg


def test_extends_itself_is_a_cycle(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "a.toml"\n')
    assert f"{a.resolve()} -> {a.resolve()}" in config_error(["--job.config_file", str(a)])


def test_extends_missing_parent_names_both_files(tmp_path: Path) -> None:
    child = write(tmp_path / "child.toml", 'extends = "nope.toml"\n')
    msg = config_error(["--job.config_file", str(child)])
    assert "config file not found" in msg
    assert str(tmp_path.resolve() / "nope.toml") in msg and f"extended by {child.resolve()}" in msg


def test_extends_must_be_a_string(tmp_path: Path) -> None:
    child = write(tmp_path / "child.toml", "extends = 3\n")
    msg = config_error(["--job.config_file", str(child)])
    assert str(child.resolve()) in msg and "'extends' must be a path string" in msg


def test_error_in_a_parent_names_the_parent_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.toml", "[training]\nstpes = 3\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[training]\nsteps = 5\n')
    msg = config_error(["--job.config_file", str(child)])
    assert str(base.resolve()) in msg and str(child.resolve()) not in msg
    assert "unknown key 'training.stpes'" in msg and "did you mean 'training.steps'" in msg


# ---------------------------------------------------------------------------------------------
# Strict errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, fragments",
    [
        ("[trainig]\nsteps = 5\n", ["unknown section [trainig]", "did you mean 'training'"]),
        ("[training]\nstpes = 5\n", ["unknown key 'training.stpes'", "did you mean 'training.steps'"]),
        ("steps = 5\n", ["unknown top-level key 'steps'", "keys belong in a [section]"]),
        ("training = 5\n", ["'training' is a section, not a key: write [training] and its keys under it"]),
        ("[quantize]\nlinear = 3\n", ["'quantize.linear' is a section, not a key"]),
        ("[lr_scheduler]\ndecay_type = ['cosine']\n",
         ["lr_scheduler.decay_type=['cosine'] is not one of 'linear', 'sqrt', 'cosine'"]),  # (was a TypeError)
        ("[training]\nsteps = 'ten'\n", ["training.steps must be an integer, got 'ten'"]),
        ("[training]\nsteps = 10.0\n", ["training.steps must be an integer, got 10.0"]),
        ("[training]\nsteps = true\n", ["training.steps must be an integer, got True"]),
        ("[training]\nsteps = {a = 1}\n", ["training.steps must be an integer"]),
        ("[debug]\ndeterministic = 1\n", ["debug.deterministic must be true or false, got 1"]),
        ("[optimizer]\nlr = 'fast'\n", ["optimizer.lr must be a finite number, got 'fast'"]),
        ("[job]\ndescription = 3\n", ["job.description must be a string, got 3"]),
        ("[activation_checkpoint]\nselective_ac_option = 2\n",
         ['activation_checkpoint.selective_ac_option must be a string, got 2 (in TOML, quote it: "2")']),
        ("[optimizer]\nname = 'adamw'\n", ["optimizer.name='adamw' is not one of 'AdamW', 'Adam'", "did you mean 'AdamW'"]),
        ("[lr_scheduler]\ndecay_type = 'cosin'\n", ["lr_scheduler.decay_type='cosin'", "did you mean 'cosine'"]),
    ],
)
def test_toml_strict_errors_name_the_file_key_and_fix(tmp_path: Path, toml: str, fragments: list[str]) -> None:
    path = write(tmp_path / "job.toml", toml)
    msg = config_error(["--job.config_file", str(path)])
    assert str(path.resolve()) in msg
    for fragment in fragments:
        assert fragment in msg


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--training.stpes", "5"], ["unknown key 'training.stpes'", "did you mean 'training.steps'"]),
        (["--training.stpes=5"], ["unknown key 'training.stpes'", "did you mean 'training.steps'"]),
        (["--trainig.steps", "5"], ["unknown section 'trainig'", "did you mean 'training'"]),
        # An unknown key before another option is reported as unknown, not as "needs a value".
        (["--metrics.enable_tensorbaord", "--training.steps", "5"],
         ["unknown key 'metrics.enable_tensorbaord'", "did you mean 'metrics.enable_tensorboard'"]),
        (["--training.steps", "ten"], ["--training.steps must be an integer, got 'ten'"]),
        (["--training.steps", "2.5"], ["--training.steps must be an integer, got '2.5'"]),
        (["--optimizer.lr", "nan"], ["--optimizer.lr must be a finite number"]),
        (["--optimizer.implementation", "fusd"], ["--optimizer.implementation='fusd' is not one of", "did you mean 'fused'"]),
        (["--training.steps"], ["--training.steps needs a value"]),
        (["--training.steps", "--debug.seed", "1"], ["--training.steps needs a value"]),
        (["steps=5"], ["unexpected command-line argument 'steps=5'", "--section.key value"]),
        # (Was a suggestion of quantize.linear.float8.emulate.)
        (["--quantize.linear.float8", "3"], ["'quantize.linear.float8' is a section, not a key: set its keys, e.g. "
                                             "quantize.linear.float8."]),
        # (Was "unexpected command-line argument 'maybe'", naming no key.)
        (["--metrics.enable_tensorboard", "maybe"], ["--metrics.enable_tensorboard is a switch: give it alone, or "
                                                     "with true or false, not 'maybe'"]),
        # torchtitan's names for what we have differently or not at all.
        (["--training.dataset", "c4_test"], ["'c4_test' is not one of", 'training.dataset = "local"']),
        (["--metrics.enable_wandb"], ["unknown key 'metrics.enable_wandb': Weights & Biases is not supported",
                                      "metrics.enable_tensorboard"]),
    ],
)
def test_cli_strict_errors_name_the_key_and_fix(argv: list[str], fragments: list[str]) -> None:
    msg = config_error(argv)
    for fragment in fragments:
        assert fragment in msg


@pytest.mark.parametrize(
    "dotted, value, rule",
    [
        ("training.steps", "-1", "training.steps=-1 is out of range: must be >= 1 (or 0 to evaluate loaded weights"),
        ("training.steps", "0", "training.steps=0 trains nothing: it is for evaluating loaded weights (checkpoint.load_only"),
        ("optimizer.lr", "-1", "optimizer.lr=-1.0 is out of range: must be > 0"),
        ("lr_scheduler.decay_ratio", "1.5", "lr_scheduler.decay_ratio=1.5 is out of range: must be in [0, 1]"),
        ("lr_scheduler.min_lr_factor", "-0.1", "lr_scheduler.min_lr_factor=-0.1 is out of range"),
        ("optimizer.beta2", "1", "optimizer.beta2=1.0 is out of range: must be in [0, 1)"),
        ("training.global_batch_size", "0", "training.global_batch_size=0 is out of range: must be -1 or >= 1"),
    ],
)
def test_out_of_range_values(dotted: str, value: str, rule: str, tmp_path: Path) -> None:
    assert rule in config_error([f"--{dotted}", value])
    section, name = dotted.split(".")
    path = write(tmp_path / "job.toml", f"[{section}]\n{name} = {value}\n")
    assert rule in config_error(["--job.config_file", str(path)])


@pytest.mark.parametrize(
    "toml, line",
    [
        ("[training]\nsteps = 5\nseq_len = = 3\n", 3),
        ("[training]\nsteps = 1\nsteps = 2\n", 3),  # duplicate key
        ('[job]\ndescription = "open\n\n', 2),  # unterminated string
        ("[training]\nsteps = 5\n[optimizer\n", 3),
        ("[training]\nsteps = [1,\n", 2),  # tomllib says "at end of document": the last line is named
    ],
)
def test_malformed_toml_names_the_file_and_line(tmp_path: Path, toml: str, line: int) -> None:
    path = write(tmp_path / "bad.toml", toml)
    msg = config_error(["--job.config_file", str(path)])
    assert "malformed TOML" in msg and str(path.resolve()) in msg and f"line {line}" in msg


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    msg = config_error(["--job.config_file", str(path)])
    assert f"config file not found: {path}" in msg and "job.config_file" in msg
    # A folder (CONFIG_FILE=train_configs) is not "not found".
    msg = config_error(["--job.config_file", str(tmp_path)])
    assert f"config file {tmp_path} is a folder, not a TOML file (job.config_file / CONFIG_FILE)" in msg


@pytest.mark.parametrize("dataset", ["local", "hf"])
def test_dataset_needing_a_path(dataset: str) -> None:
    msg = config_error(["--training.dataset", dataset])
    assert f"training.dataset={dataset!r} needs training.dataset_path" in msg
    assert load_config(["--training.dataset", dataset, "--training.dataset_path", "x"]).training.dataset_path == "x"


def test_unknown_model_flavor_lists_the_flavors() -> None:
    msg = config_error(["--model.flavor", "9B"])
    assert "model.flavor='9B' is not a llama3 flavor" in msg and "debugmodel" in msg and "8B" in msg


def test_unknown_model_name_lists_the_models() -> None:
    msg = config_error(["--model.name", "gpt2"])
    assert "model.name='gpt2' is unknown" in msg and "llama3" in msg


def test_seq_len_beyond_max_seq_len() -> None:
    msg = config_error(["--training.seq_len", "4096", "--model.max_seq_len", "2048"])
    assert "training.seq_len=4096 exceeds model.max_seq_len=2048" in msg


# ---------------------------------------------------------------------------------------------
# to_toml round trip
# ---------------------------------------------------------------------------------------------


def round_trip(cfg: JobConfig, tmp_path: Path) -> None:
    path = write(tmp_path / "resolved.toml", to_toml(cfg))
    loaded = load_file(path)
    # job.config_file is the file that was loaded, so it names the written file.
    assert loaded == dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, config_file=str(path)))


def test_round_trip_defaults(tmp_path: Path) -> None:
    round_trip(JobConfig(), tmp_path)


def test_round_trip_debug_config(tmp_path: Path) -> None:
    round_trip(load_file(REPO / "train_configs" / "debug_model.toml"), tmp_path)


def test_round_trip_non_default_values(tmp_path: Path) -> None:
    cfg = load_config(
        ["--training.steps", "123", "--optimizer.lr", "3e-5", "--optimizer.eps", "1e-12", "--optimizer.name", "Adam",
         "--lr_scheduler.decay_ratio", "0.25", "--metrics.enable_tensorboard", "--model.max_seq_len", "4096",
         "--training.dataset", "local", "--training.dataset_path", "C:\\data\\*.txt",
         "--job.description", 'a "quoted"\ttab\nnew line \x01 \x7f é']
    )
    assert cfg.job.description.endswith("é") and cfg.optimizer.eps == 1e-12
    round_trip(cfg, tmp_path)


# ---------------------------------------------------------------------------------------------
# The schema documents itself
# ---------------------------------------------------------------------------------------------


def test_every_section_is_known_and_has_keys() -> None:
    # The torchtitan sections users know are all there.
    assert {"job", "model", "optimizer", "lr_scheduler", "training", "parallelism", "metrics", "debug"} <= set(sections())
    with_keys = {k.section for k in keys().values()}
    for s in sections():
        # A section without keys of its own only groups other sections ([quantize.linear.float8]).
        assert s in with_keys or any(other.startswith(s + ".") for other in sections()), f"[{s}] has no keys"


@pytest.mark.parametrize("dotted", list(keys()))
def test_every_key_has_a_one_line_doc(dotted: str) -> None:
    doc = keys()[dotted].doc
    assert doc.strip(), f"{dotted} has no docstring"
    assert "\n" not in doc


@pytest.mark.parametrize("dotted", list(keys()))
def test_every_default_passes_its_own_type_check(dotted: str) -> None:
    k = keys()[dotted]
    assert coerce(k, k.default, from_cli=False) == k.default


def test_defaults_are_valid() -> None:
    validate(JobConfig())


def test_every_key_can_be_set_on_the_cli() -> None:
    argv = [f"--{k.dotted}={cli_text(k.default)}" for k in keys().values()]
    assert load_config(argv) == JobConfig()


def test_literal_keys_list_their_choices_in_help() -> None:
    from torchtitan_like.config.reference import help_text

    text = help_text()
    assert "'AdamW' | 'Adam'" in text and "Literal" not in text
    assert keys()["optimizer.name"].type == Literal["AdamW", "Adam"]


# ---------------------------------------------------------------------------------------------
# README config reference
# ---------------------------------------------------------------------------------------------


def _config_reference_tool() -> Any:
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_markdown_reference_lists_every_key_with_its_doc() -> None:
    text = markdown_reference()
    for section in {k.section for k in keys().values()}:
        assert f"#### `[{section}]`" in text
    for k in keys().values():
        assert f"| `{k.name}` |" in text and k.doc in text


def test_render_replaces_only_the_marked_section() -> None:
    tool = _config_reference_tool()
    stale = f"# Title\n\nintro\n{README_BEGIN}\nold table\n{README_END}\n\n## After\n"
    new = tool.render(stale)
    assert new.startswith(f"# Title\n\nintro\n{README_BEGIN}\n") and new.endswith(f"{README_END}\n\n## After\n")
    assert "old table" not in new and markdown_reference() in new
    assert tool.render(new) == new  # idempotent


def test_readme_config_reference_is_up_to_date() -> None:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")  # fails until README.md lands
    assert README_BEGIN in text and README_END in text, "README.md lacks the config-reference markers"
    assert _config_reference_tool().render(text) == text, "run: python tools/config_reference.py"


def test_config_reference_check_command() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_toml_file_with_a_utf8_bom_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 7\n")  # some Windows editors start files with a BOM
    assert load_config(["--job.config_file", str(path)]).training.steps == 7


def test_a_key_given_twice_an_empty_file_and_a_nul_character(tmp_path: Path, caplog) -> None:
    """Accepted but said: a key given twice on the command line (the last wins), a config file that sets
    nothing. Refused: a NUL character, which no path can hold (open() raised ValueError mid-run)."""
    empty = write(tmp_path / "empty.toml", "")
    with caplog.at_level("WARNING", logger="torchtitan_like.config.loader"):
        cfg = load_file(empty, "--optimizer.lr", "1e-3", "--optimizer.lr", "2e-3", "--training.steps", "5",
                        "--training.steps", "5")
    assert cfg.optimizer.lr == 2e-3
    assert f"config file {empty.resolve()} sets nothing: every key takes its default" in caplog.text
    assert "--optimizer.lr is given twice on the command line (0.001, then 0.002): the last one wins" in caplog.text
    assert "training.steps is given twice" not in caplog.text  # (the same value twice changes nothing)
    nul = write(tmp_path / "nul.toml", '[job]\ndump_folder = "out\\u0000put"\n')
    assert "job.dump_folder='out\\x00put' contains a NUL character" in config_error(["--job.config_file", str(nul)])


def test_torchtitans_hub_dataset_names_read_the_same_data(tmp_path) -> None:
    """torchtitan's c4 and c4_validation are the Hugging Face hub's allenai/c4 ("en"): read as dataset = "hf"
    with those settings, where the job gives none (a dataset_path there is a local copy, read as it is)."""
    toml = tmp_path / "tt.toml"
    toml.write_text('[training]\ndataset = "c4"\n[validation]\nenable = true\ndataset = "c4_validation"\n')
    cfg = load_config(["--job.config_file", str(toml)])
    t, v = cfg.training, cfg.validation
    assert (t.dataset, t.dataset_path, t.dataset_config, t.dataset_split) == ("hf", "allenai/c4", "en", "train")
    assert (v.dataset, v.dataset_path, v.dataset_config, v.dataset_split) == ("hf", "allenai/c4", "en", "validation")
    local = load_config(["--job.config_file", str(toml), "--training.dataset_path", "/data/c4"]).training
    assert (local.dataset, local.dataset_path, local.dataset_config) == ("hf", "/data/c4", "en")
    # Another dataset on the command line replaces it, settings and all.
    assert load_config(["--job.config_file", str(toml), "--training.dataset", "embedded"]).training.dataset_path is None


def test_a_config_file_named_inside_a_toml_is_said_to_be_a_record_only(tmp_path: Path, caplog) -> None:
    """[job] config_file = "other.toml" in a file read nothing, silently (extends is the way to build on a
    file; a resolved config.toml records the file it came from under that key)."""
    (tmp_path / "other.toml").write_text("[training]\nsteps = 7\n", encoding="utf-8")
    main = tmp_path / "main.toml"
    main.write_text('[job]\nconfig_file = "other.toml"\n', encoding="utf-8")
    with caplog.at_level("INFO", logger="torchtitan_like.config.loader"):
        cfg = load_config(["--job.config_file", str(main)])
    assert cfg.job.config_file == str(main) and cfg.training.steps != 7
    assert f"{main}: job.config_file = 'other.toml' is a record only, not read (to build on a file, write extends = " \
           "'other.toml' at the top)" in caplog.text
    # A resolved config.toml loads back to the same config (its job.config_file names where it came from).
    again = tmp_path / "config.toml"
    again.write_text(to_toml(cfg), encoding="utf-8")
    assert dataclasses.replace(load_config(["--job.config_file", str(again)]).job, config_file=str(main)) == cfg.job


def test_config_reference_refuses_an_unknown_argument_and_leaves_the_readme(capsys) -> None:
    """A typo of --check (or --help read as a request to rewrite) used to rewrite README.md and exit 0."""
    before = (REPO / "README.md").read_bytes()
    with pytest.raises(SystemExit) as e:
        _config_reference_tool().main(["--chek"])
    assert e.value.code == 2 and "unrecognized arguments: --chek" in capsys.readouterr().err
    assert (REPO / "README.md").read_bytes() == before


def test_extends_below_a_section_header_says_where_extends_goes(tmp_path: Path) -> None:
    """It was "unknown key 'training.extends' (did you mean 'training.steps'?)"."""
    path = tmp_path / "job.toml"
    path.write_text('[training]\nextends = "base.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"extends is read only at the top of a file, before any \[section\] "
                                          r"header \(here it is training.extends\)"):
        load_config(["--job.config_file", str(path)])


def test_a_profiling_schedule_that_never_fires_in_the_run_is_named():
    """profiling.profile_freq (default 10) above training.steps: the run ended without a trace, and nothing said
    why. validation.freq above it is not named: the last step validates whatever the freq."""
    from torchtitan_like.config.validate import ignored_settings

    short = load_config(["--training.steps", "3", "--validation.enable", "--profiling.enable_profiling"])
    assert ignored_settings(short, pp=1) == [
        "profiling.enable_profiling (profiling.profile_freq=10 > training.steps=3: no trace is captured; lower "
        "profiling.profile_freq)",
    ]
    assert ignored_settings(load_config(["--training.steps", "10", "--validation.enable",
                                         "--profiling.enable_profiling"]), pp=1) == []



def test_decay_shape_keys_without_a_decay_are_named():
    """lr_scheduler.decay_ratio = 0 has no decay phase: a decay_type or min_lr_factor set beside it did nothing,
    without a word."""
    from torchtitan_like.config.validate import ignored_settings

    cfg = load_config(["--lr_scheduler.decay_ratio", "0", "--lr_scheduler.decay_type", "cosine",
                       "--lr_scheduler.min_lr_factor", "0.1"])
    assert ignored_settings(cfg, pp=1) == [
        "lr_scheduler.decay_type (lr_scheduler.decay_ratio=0.0)",
        "lr_scheduler.min_lr_factor (lr_scheduler.decay_ratio=0.0)",
    ]
    assert ignored_settings(load_config(["--lr_scheduler.decay_ratio", "0.2", "--lr_scheduler.decay_type", "cosine",
                                         "--lr_scheduler.min_lr_factor", "0.1"]), pp=1) == []
