"""Generated shell completion: valid bash, and it completes the right words."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from chadthrottle.cli.completion import script, walk
from chadthrottle.cli.main import build_parser


def complete(words: list[str]) -> list[str]:
    """Source the bash script, call its function as bash would, return COMPREPLY."""
    quoted = " ".join(f"'{w}'" for w in words)
    prog = script("bash", build_parser()) + f"""
COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}
_chadthrottlectl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "--norc", "--noprofile"], input=prog, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [w for w in out.splitlines() if w]


def test_walk_sees_every_command() -> None:
    nodes = {n.path: n for n in walk(build_parser())}
    for path in ("", "limit", "clear", "stats", "list", "top", "unit", "unit limit",
                 "unit clear", "run", "info", "completion"):
        assert path in nodes
    assert nodes["limit"].positional == "pid" and "--name" in nodes["limit"].value_options
    assert nodes["unit limit"].positional == "unit"
    assert nodes["completion"].shells == ["bash", "zsh"]


def test_bash_script_is_valid() -> None:
    subprocess.run(["bash", "-n"], input=script("bash", build_parser()), text=True, check=True)


def test_bash_completes_commands_options_and_values() -> None:
    assert complete(["chadthrottlectl", "li"]) == ["limit", "list"]
    assert complete(["chadthrottlectl", "unit", ""]) == ["limit", "clear"]
    assert "--download" in complete(["chadthrottlectl", "limit", "12", "--"])
    assert "--json" in complete(["chadthrottlectl", "--json", "stats", "--j"])
    assert complete(["chadthrottlectl", "limit", "1", "-d", "1"]) == ["1M", "1.5M", "10mbit"]
    assert complete(["chadthrottlectl", "completion", ""]) == ["bash", "zsh"]
    assert "1" in complete(["chadthrottlectl", "stats", ""])  # pids from /proc
    assert "sh" in complete(["chadthrottlectl", "run", "-d", "1M", "--", "sh"])


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_is_valid_and_completes(tmp_path) -> None:
    subprocess.run(["zsh", "-n"], input=script("zsh", build_parser()), text=True, check=True)
    path = tmp_path / "ct.zsh"
    path.write_text(script("zsh", build_parser()))
    # bashcompinit calls the function under `emulate -L sh` (0-based arrays): do the same
    prog = f"""autoload -U compinit && compinit -u -d {tmp_path}/zcompdump
source {path}
t() {{ emulate -L sh; setopt kshglob noshglob braceexpand
      COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _chadthrottlectl
      print -r -- "${{COMPREPLY[*]}}"; }}
t chadthrottlectl li
t chadthrottlectl unit ''
t chadthrottlectl run -u 5
"""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["zsh", "-f", "-c", prog], capture_output=True, text=True,
                         check=True, timeout=30, env=env).stdout.splitlines()
    # zsh's compgen returns every candidate and lets compadd match the prefix: do that here
    typed = ["li", "", "5"]
    got = [[w for w in line.split() if w.startswith(prefix)]
           for line, prefix in zip(out, typed, strict=True)]
    assert got == [["limit", "list"], ["limit", "clear"], ["50K", "512KiB/s"]]


def test_zsh_script_wraps_the_bash_one() -> None:
    text = script("zsh", build_parser())
    assert text.startswith("#compdef chadthrottlectl") and "bashcompinit" in text
    with pytest.raises(ValueError):
        script("fish", build_parser())
