"""The `memprobe` command's options come from the typed configs; the CLI lives in memprobe/cli/
only, imports the library lazily, and the package has no import circles (issue #14)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from memprobe.audit import AuditConfig
from memprobe.cli import COMMANDS, build_parser, main
from memprobe.cli.options import add_config_options, config_from_args
from memprobe.distributed.engines import EngineOptions

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memprobe"

# (command, config, fields whose option is written by hand, and why)
GENERATED = [
    ("audit", AuditConfig, ()),
    ("capture", EngineOptions, ("engine",)),  # no default on the CLI: without --engine, one plain process
    ("label", EngineOptions, ("engine",)),
]
REQUIRED = {"capture": ["--sites", "s", "--out", "o"], "label": ["--output", "o"]}


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def _expected_type(hint):  # noqa: ANN001, ANN202
    """(python type, choices, several values) an option of annotation `hint` must have."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        t, choices, _ = _expected_type(typing.get_args(hint)[0])
        return t, choices, True
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0]), list(typing.get_args(hint)), False
    return hint, None, False


@pytest.mark.parametrize(("command", "config", "by_hand"), GENERATED)
def test_every_config_field_is_an_option_with_its_default_and_type(command, config, by_hand):
    actions = _actions(_subparser(build_parser([command]), command))
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in by_hand:
            continue
        assert f.name in actions, f"{command}: no option for {config.__name__}.{f.name}"
        action, default = actions[f.name], getattr(config(), f.name)
        assert action.default == default, (f.name, action.default, default)
        kind, choices, several = _expected_type(hints[f.name])
        if kind is bool:
            assert action.const is (not default) and action.nargs == 0, f.name
            assert action.option_strings == [("--no-" if default else "--") + f.name.replace("_", "-")]
        else:
            assert action.type is kind and action.choices == choices, (f.name, action.type, action.choices)
            assert (action.nargs == "+") is several, f.name
            assert action.option_strings == ["--" + f.name.replace("_", "-")]


@pytest.mark.parametrize(("command", "config", "by_hand"), GENERATED)
def test_parsed_defaults_give_the_default_config(command, config, by_hand):
    given = ["--engine", "process"] if "engine" in by_hand else []
    args = build_parser([command]).parse_args([command, *REQUIRED.get(command, []), *given])
    assert config_from_args(config, args) == config()


def test_audit_flags_reach_the_config():
    argv = ["audit", "--seed", "3", "--dtype", "float16", "--quick", "--min-prob", "0.7", "--sites",
            "blocks.0.hook_resid_post", "--lab", "L"]
    args = build_parser(argv).parse_args(argv)
    assert config_from_args(AuditConfig, args) == AuditConfig(
        seed=3, dtype="float16", quick=True, min_prob=0.7, sites="blocks.0.hook_resid_post", lab="L")


def test_engine_flags_reach_the_options():
    argv = ["capture", "--sites", "s", "--out", "o", "--engine", "ray", "--workers", "3", "--address",
            "h:1", "--gpus-per-worker", "0.5", "--cpus-per-worker", "1"]
    args = build_parser(argv).parse_args(argv)
    assert config_from_args(EngineOptions, args) == EngineOptions(
        engine="ray", workers=3, address="h:1", gpus_per_worker=0.5, cpus_per_worker=1.0)


@dataclass(frozen=True)
class Every:
    """Every annotation the generator knows.

    rate: the learning rate, with 100%
        of its text on two lines
    """

    count: int = 3
    rate: float = 0.5
    name: str = "x"
    path: Path = Path("a/b")
    limit: int | None = None
    knobs: tuple[float, ...] = (0.5, 1.0)
    tags: list[str] = field(default_factory=lambda: ["p", "q"])
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "how to run"})
    verbose: bool = False
    cache: bool = True


def _every_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="every")
    add_config_options(p, Every)
    return p


def test_every_annotation_round_trips():
    p = _every_parser()
    assert config_from_args(Every, p.parse_args([])) == Every()
    args = p.parse_args(["--count", "7", "--rate", "1e-3", "--name", "y", "--path", "c", "--limit", "9",
                         "--knobs", "2", "3", "--tags", "r", "--mode", "slow", "--verbose", "--no-cache"])
    assert config_from_args(Every, args) == Every(count=7, rate=1e-3, name="y", path=Path("c"), limit=9,
                                                  knobs=(2.0, 3.0), tags=["r"], mode="slow", verbose=True,
                                                  cache=False)
    assert config_from_args(Every, args, base=Every(), count=1).count == 1  # given beats args
    text = p.format_help()
    assert "how to run (default fast)" in text
    assert "the learning rate, with 100% of its text on two lines (default 0.5)" in " ".join(text.split())


@pytest.mark.parametrize(("argv", "message"), [
    (["--count", "many"], "argument --count: invalid int value: 'many'"),
    (["--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
    (["--mode", "medium"], "argument --mode: invalid choice: 'medium'"),
    (["--knobs", "1", "x"], "argument --knobs: invalid float value: 'x'"),
])
def test_a_bad_value_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _every_parser().parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["audit", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["audit", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["capture", "--sites", "s", "--out", "o", "--workers", "two"], "argument --workers: invalid int value"),
])
def test_the_commands_refuse_a_bad_value_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.startswith("usage: memprobe " + argv[0]), err


def test_a_field_without_a_command_line_form_is_refused_by_name():
    @dataclass
    class Nested:
        inner: Every = field(default_factory=Every)

    with pytest.raises(TypeError, match="Nested.inner"):
        add_config_options(argparse.ArgumentParser(), Nested)
    with pytest.raises(TypeError, match="has no fields"):
        add_config_options(argparse.ArgumentParser(), Every, only=["nope"])


def _commands() -> list[tuple[str, ...]]:
    """Every command and subcommand path, e.g. ("probe", "train")."""
    paths = []
    for name in COMMANDS:
        parser = _subparser(build_parser([name]), name)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        paths += [(name, s) for s in subs[0].choices] if subs else [(name,)]
    return paths


@pytest.mark.parametrize("path", _commands(), ids=" ".join)
def test_help_of_every_command_lists_its_options(path, capsys):
    options = [o for a in _subparser(build_parser(list(path)), *path)._actions for o in a.option_strings]
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith("usage: memprobe " + " ".join(path))
    assert len(options) > 1 or path == ("models",)
    missing = [o for o in options if not re.search(rf"(^|[\s\[,]){re.escape(o)}\b", text)]
    assert not missing, missing


def test_top_level_help_lists_every_command_and_loads_no_library():
    code = ("import sys\nfrom memprobe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m in ('torch', 'transformers', 'ray', 'numpy'))\n"
            "print('LOADED', heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stdout, run.stdout[-500:]
    assert all(name in run.stdout for name in COMMANDS)


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


# Parsers of the experiment scripts (not `memprobe` commands): experiments/ import them from here.
EXPERIMENT_PARSERS = {"results.py", "studies/smi.py"}


def test_only_the_cli_package_holds_command_line_code():
    """The grep of issue 14: argparse code and imports of memprobe.cli live in memprobe/cli/ only."""
    argparse_code = re.compile(r"^\s*(import argparse|from argparse )|add_parser\(|add_subparsers\(|register_cli")
    uses_cli = re.compile(r"^\s*(from memprobe\.cli\b|import memprobe\.cli\b)")
    hits, cli_users = [], []
    for p in _py_files(PACKAGE):
        rel = p.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/"):
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if argparse_code.search(line) and rel not in EXPERIMENT_PARSERS:
                hits.append(f"{rel}:{n}: {line.strip()}")
            if uses_cli.search(line):
                cli_users.append(f"{rel}:{n}")
    assert not hits, hits
    # the entry points: `python -m memprobe` and `torchrun -m memprobe.distributed.torchrun` (inside main())
    assert sorted(u.split(":")[0] for u in cli_users) == ["__main__.py", "distributed/torchrun.py"], cli_users
    for rel in ("cli/__init__.py", "cli/__main__.py"):
        assert (PACKAGE / rel).exists()
    assert 'memprobe = "memprobe.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_cli_and_audit_use_no_dynamic_imports():
    for p in [*_py_files(PACKAGE / "cli"), PACKAGE / "audit.py"]:
        assert "importlib" not in p.read_text() and "__import__" not in p.read_text(), p


def test_cli_modules_import_the_library_only_inside_functions():
    """What `memprobe --help` loads: the cli modules' top-level imports stay within cli/ and errors."""
    for p in _py_files(PACKAGE / "cli"):
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memprobe"):
                assert node.module.startswith("memprobe.cli") or node.module == "memprobe.errors", (p, node.module)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(body: list[ast.stmt]):  # noqa: ANN202
    """Import statements that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        for name in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, name, None)
            if isinstance(inner, list):
                yield from _top_level_imports(inner)


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of the import-time graph of package `root`: A -> B when importing A runs an import of B
    (or of a package above B that is not above A) or reads a name from B's namespace."""
    modules = {_module_name(p, root): p for p in _py_files(root)}

    def above(m: str) -> set[str]:
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph: dict[str, set[str]] = {}
    for m, p in modules.items():
        edges: set[str] = set()
        for node in _top_level_imports(ast.parse(p.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            for t in (t for t in targets if t in modules):
                edges |= {t} | {a for a in above(t) if a not in above(m)}
        graph[m] = edges - {m}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v):], v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_the_cycle_finder_finds_a_circle(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")  # a package importing its own module
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from pkg import a\n\nthing = 1\n")
    (pkg / "sub" / "c.py").write_text("")
    assert import_cycles(pkg) == []  # the import inside f() runs later, not at import time
    (pkg / "sub" / "c.py").write_text("from pkg.a import x\n")  # a -> sub (above b) -> c -> a
    assert import_cycles(pkg) == [["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"]]


def test_memprobe_has_no_import_cycles():
    assert import_cycles(PACKAGE) == []


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, pkgutil, memprobe\n"
            "names = sorted(m.name for m in pkgutil.walk_packages(memprobe.__path__, 'memprobe.')\n"
            "               if not m.name.endswith('__main__'))\n"
            "for n in names:\n    importlib.import_module(n)\nprint('IMPORTED', len(names))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split("IMPORTED")[1]) >= len(_py_files(PACKAGE)) - 5
