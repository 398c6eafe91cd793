"""The mutation benchmark's mutations still name real code: each quoted line occurs exactly once in its file, so a
refactor that moves a formula fails here, in the fast suite, not first in a 10-minute benchmark run."""

import importlib.util
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "eval"


def test_every_mutation_quotes_its_line_exactly_once(monkeypatch):
    monkeypatch.syspath_prepend(str(EVAL))  # the script imports results_file beside it
    spec = importlib.util.spec_from_file_location("mutation_score", EVAL / "mutation_score.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mutation_score", module)
    spec.loader.exec_module(module)
    module.check_mutations(module.MUTATIONS)  # SystemExit naming each stale mutation otherwise
    assert len({m.name for m in module.MUTATIONS}) == len(module.MUTATIONS) >= 40
