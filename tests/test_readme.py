"""Every command in README.md's code blocks is exercised, without training anything.

- ``python -m scripts.tools.<name> ...``: the tool answers ``--help`` with exit status 0 (for a sub-command such as
  ``convert``, ``<name> convert --help``), every ``--option`` the README gives appears in that help, and the config
  files it names exist and parse.
- ``python -m monai.bundle run <id> ...`` (also under ``torchrun``): the config files exist and merge with
  ``monai.bundle.ConfigParser`` in the README's order, the run id is in the merged config, and every ``--key`` the
  README sets is a key of it (``monai.bundle run`` would silently add a misspelt one).
- ``python -m monai.bundle verify_metadata`` / ``verify_net_in_out``: the files exist, the network id is defined.
- The tool commands of docs/*.md get the same ``--help`` check.
- No other ``python -m`` module appears in README (so nothing escapes the checks above), and neither README nor
  docs/ still name a tool by its pre-``scripts.tools`` module.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUNDLE_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "filepath"}  # monai.bundle's own arguments
OTHER_MODULES = {"venv", "pytest"}  # the two commands' installation and test steps
OLD_TOOLS = r"scripts\.(demo|demo_data|benchmark|bundle_check|compare|export|figures|weights|volumes)\b(?!\.)"


def code_blocks(text: str) -> list[str]:
    """The shell code blocks (```` ```bash ````, ```` ```sh ```` or unlabelled) of a Markdown text."""
    blocks, lines, fence = [], [], None  # fence: the opening line of the block we are in, None outside
    for line in text.splitlines(keepends=True):
        if not line.startswith("```"):
            lines.append(line)
        elif fence is None:
            fence, lines = line.strip(), []
        else:
            if fence in ("```", "```bash", "```sh"):
                blocks.append("".join(lines))
            fence = None
    return blocks


def commands_in(path: Path, only: str = "") -> list[list[str]]:
    """Each command of a Markdown file's code blocks (those lines containing ``only``) as argv, from ``-m`` on
    (``["-m", "module", args...]``); continuation lines joined, comments dropped, ``a && b`` split."""
    commands = []
    for block in code_blocks(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if only not in line:
                continue
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                part, tokens = tokens[:cut], tokens[cut + 1 :]
                if "-m" in part:
                    commands.append(part[part.index("-m") :])
    return commands


DOCS = sorted((ROOT / "docs").glob("*.md"))
COMMANDS = commands_in(README)
TOOLS = [c for c in COMMANDS if c[1].startswith("scripts.tools.")]
DOC_TOOLS = [
    c
    for doc in DOCS
    for c in commands_in(doc, "-m scripts.tools.")
    if c[1].startswith("scripts.tools.") and c not in TOOLS
]
BUNDLE = [c for c in COMMANDS if c[1] == "monai.bundle"]


def command_id(cmd: list[str]) -> str:
    return " ".join(cmd[1:])[:90]


def options(args: list[str]) -> dict[str, str | None]:
    """``--key value`` pairs (``--flag`` alone: None; a ``--key`` may take several values, the first is kept)."""
    out = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg[2:]] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def config_files(value: str) -> list[Path]:
    names = ast.literal_eval(value) if value.startswith("[") else [value]
    return [ROOT / n for n in names]


def merged(files: list[Path]) -> ConfigParser:
    missing = [str(f.relative_to(ROOT)) for f in files if not f.is_file()]
    assert not missing, f"README names config files that do not exist: {missing}"
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


def test_readme_has_the_commands_it_should():
    """The extraction works: both of the two commands, the tools and the bundle commands are found."""
    modules = [c[1] for c in COMMANDS]
    assert "scripts.tools.demo" in modules and "pytest" in modules, modules
    assert len(TOOLS) >= 5 and len(BUNDLE) >= 10, modules
    assert "python -m pytest -q tests" in README.read_text(encoding="utf-8")  # .ci/run's command, verbatim


def test_no_unchecked_module_in_readme():
    unchecked = sorted({c[1] for c in COMMANDS} - {c[1] for c in TOOLS + BUNDLE} - OTHER_MODULES)
    assert not unchecked, f"README runs modules that tests/test_readme.py does not check: {unchecked}"


@pytest.mark.parametrize("path", ["README.md", *(f"docs/{p.name}" for p in DOCS)])
def test_no_old_tool_names(path):
    """Tools are ``python -m scripts.tools.<name>`` now; README and docs/ name no old module path."""
    text = (ROOT / path).read_text(encoding="utf-8")
    old = sorted({m.group(0) for m in re.finditer(r"python -m " + OLD_TOOLS, text)})
    assert not old, f"{path} still uses {old}"


# ---- scripts.tools.* ----------------------------------------------------------------------------
HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
out = {}
for key in json.loads(sys.argv[1]):
    module, *sub = key.split(" ")
    buf, code = io.StringIO(), 0
    sys.argv = [module, *sub, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, _ = 1, buf.write(traceback.format_exc())
    out[key] = [code, buf.getvalue()]
print("\n@@HELP@@" + json.dumps(out))
"""


def help_key(cmd: list[str]) -> str:
    """``module`` or ``module subcommand`` (a bare word right after the module, e.g. ``convert``)."""
    sub = cmd[2] if len(cmd) > 2 and re.fullmatch(r"[a-z_]+", cmd[2]) else None
    return f"{cmd[1]} {sub}" if sub else cmd[1]


@lru_cache(maxsize=1)
def all_help() -> dict[str, tuple[int, str]]:
    """``--help`` of every README tool, all in one interpreter (torch and MONAI imported once, not per tool)."""
    keys = sorted({help_key(c) for c in TOOLS + DOC_TOOLS})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, json.dumps(keys)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert "@@HELP@@" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(proc.stdout.split("@@HELP@@")[-1]).items()}


@pytest.mark.parametrize("cmd", TOOLS + DOC_TOOLS, ids=command_id)
def test_tool_command(cmd):
    code, text = all_help()[help_key(cmd)]
    assert code == 0, f"python -m {help_key(cmd)} --help exited with {code}:\n{text[-3000:]}"
    args = options(cmd[2:])
    unknown = [f"--{k}" for k in args if f"--{k}" not in text]
    assert not unknown, f"README gives {unknown} to {cmd[1]}, whose --help does not list them:\n{text}"
    if "config_file" in args:
        merged(config_files(args["config_file"]))
    if "configs" in args:  # compare's overlays of train.yaml, names under configs/
        names = cmd[cmd.index("--configs") + 1 :]
        names = names[: next((i for i, n in enumerate(names) if n.startswith("--")), len(names))]
        merged([ROOT / "configs" / "train.yaml", *(ROOT / "configs" / n for n in names)])


# ---- monai.bundle ------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", BUNDLE, ids=command_id)
def test_bundle_command(cmd):
    sub, args = cmd[2], cmd[3:]
    positional = args[: next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]
    opts = options(args)
    for key in ("meta_file", "filepath"):
        if key in opts:
            path = ROOT / opts[key]
            assert path.is_file(), f"{command_id(cmd)}: {opts[key]} does not exist"
            json.loads(path.read_text())
    if sub == "verify_metadata":
        assert {"meta_file", "filepath"} <= set(opts)
        return
    assert sub in ("run", "verify_net_in_out"), f"unexpected monai.bundle command {sub!r}"
    assert "config_file" in opts, command_id(cmd)
    parser = merged(config_files(opts["config_file"]))
    assert positional, f"{command_id(cmd)}: no run id / network id"
    assert positional[0] in parser, f"{command_id(cmd)}: {positional[0]!r} is not defined by the merged configs"
    if sub == "run":
        unknown = [f"--{k}" for k in opts if k not in BUNDLE_ARGS and k not in parser]
        assert not unknown, f"{command_id(cmd)}: {unknown} are not keys of the merged configs"
