"""Every command's help: each option says what it does and its default in one form, "(default X)", choices
read as words, positional names are upper-case and name the same thing the same way."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

from moekit.cli.main import COMMANDS


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser (bench: each benchmark's), built the way its main builds it."""
    out = {}
    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        if name == "bench":
            from moekit.cli.bench import build_parser as bench_parser

            root = bench_parser()
            sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
            out |= {f"bench {k}": p for k, p in sub.choices.items()}
        else:
            out[name] = mod.build_parser()
    return out


PARSERS = _parsers()
# a positional that names a directory to read: one word per kind of thing
POSITIONALS = {"RUN_DIR", "RUN_DIRS", "SRC", "DST", "DIR", "MODEL", "PRESET", "TRAIN_FLAGS"}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_says_what_it_does_and_its_default(command):
    p = PARSERS[command]
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        where = f"moekit {command} {'/'.join(a.option_strings) or a.dest}"
        assert a.help and a.help != argparse.SUPPRESS, where
        assert not re.search(r"issue \d|#\d|\('|\(\"", a.help), (where, a.help)
        if a.option_strings:
            assert re.search(r"\(default [^)]+\)", a.help), (where, a.help)
            assert not re.search(r"default: |\bdefaults? to\b", a.help), (where, a.help)
            if a.choices:
                assert a.metavar, (where, "choices shown as {a,b,c}: give a metavar and list them in the help")
        else:
            assert (a.metavar or a.dest) in POSITIONALS, (where, a.metavar or a.dest)
    for g in p._action_groups:
        assert not re.search(r"issue|#\d", g.title or ""), g.title
