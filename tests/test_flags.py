"""Every flag of every tool has its domain declared once (the tool's DOMAINS table, argparse's choices, or a switch),
and a number outside it is refused in one line that names the flag, before any model or reward loads. Generated
from the parsers and the tables, so a flag added without a domain, or a domain that lets NaN through, fails here."""
import argparse
import math

import pytest
from conftest import refusal

import ablate
import agreement
import bench
import evaluate
import flags
import pipeline_bench
import reward
import sample
import toy
import train
from inputs import ANY

# tool -> (its parser, its table, its main, the arguments a run of it needs besides the flag under test)
TOOLS = {
    "train.py": (flags.parser, flags.DOMAINS + sample.MODEL_DOMAINS, train.main,
                 ["--model", "tiny", "--reward", "pixel", "--size", "16x16", "--frames", "4"]),
    "sample.py": (sample.parser, sample.DOMAINS, sample.main, ["--model", "tiny"]),
    "evaluate.py": (evaluate.parser, evaluate.DOMAINS, evaluate.main, ["."]),
    "reward.py": (reward.parser, reward.DOMAINS, reward.main, ["score", "x.mp4", "--reward", "pixel"]),
    "agreement.py": (agreement.parser, agreement.DOMAINS, agreement.main, ["m.json", "--reward", "pixel"]),
    "toy.py": (toy.parser, toy.DOMAINS, toy.main, []),
    "bench.py": (bench.parser, bench.DOMAINS, bench.main, ["--device", "cpu"]),
    "pipeline_bench.py": (pipeline_bench.parser, pipeline_bench.DOMAINS, pipeline_bench.main, ["--device", "cpu"]),
    "ablate.py": (ablate.parser, ablate.DOMAINS, ablate.main, []),
}
SWITCHES = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, SWITCHES)]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_of_every_tool_declares_its_domain(tool):
    make, table, _, _ = TOOLS[tool]
    declared = {flag for flag, _, _ in table}
    undeclared = [a.dest for a in options(make()) if a.choices is None and a.dest not in declared]
    assert not undeclared, f"{tool}: no domain declared for {undeclared}"
    unknown = declared - {a.dest for a in make()._actions}
    assert not unknown, f"{tool}: its table names flags it does not have: {unknown}"


def numbers(action) -> list[str]:
    """Values a careless or unlucky user types: not numbers at all, signs, zero, the huge."""
    if action.type is float:
        return ["nan", "inf", "-inf", "-1", "0", "1e300"]
    return ["-1", "0", "1000000000"] if action.type is int else []


def method_for(flag: str) -> list[str]:
    """train.py: a method that reads `flag` (another method refuses it before its domain is looked at)."""
    applies = flags.METHOD_FLAGS.get(flag)
    for m in flags.METHOD_NAMES:
        if applies is None or applies(argparse.Namespace(method=m, grpo_kl_reference="moving")):
            return ["--method", m] + (["--grpo-kl-reference", "moving"] if flag == "k" and m == "grpo" else [])
    raise AssertionError(flag)


def cases():
    found = []
    for tool, (make, table, _, _) in TOOLS.items():
        checks = {flag: ok for flag, ok, _ in table if ok is not ANY}
        for action in options(make()):
            if action.dest in checks and action.option_strings:
                found += [pytest.param(tool, action.option_strings[-1], action.dest, v, id=f"{tool}{action.option_strings[-1]}={v}")
                          for v in numbers(action)]
    return found


@pytest.fixture
def nothing_loads(monkeypatch):
    """Building a model or a reward fails the test: a refusal must come before them."""
    import model
    import run

    def loaded(*_, **__):
        raise AssertionError("a model or reward was built before the flags were checked")

    for where, name in ((model, "build_model"), (sample, "build_model"), (run, "build_reward"), (ablate, "build_model"),
                        (ablate, "build_reward"), (reward, "build_reward"), (agreement, "build_reward"),
                        (evaluate, "build_reward"), (toy, "pretrain")):
        monkeypatch.setattr(where, name, loaded)


@pytest.mark.parametrize("tool, flag, dest, value", cases())
def test_numbers_outside_a_flags_domain_are_refused_in_one_line_before_anything_loads(
        tool, flag, dest, value, tmp_path, capsys, nothing_loads):
    make, table, main, needs = TOOLS[tool]
    argv = needs + (method_for(dest) if tool == "train.py" else []) + [f"{flag}={value}"]  # = : "-inf" is no flag
    if tool in ("train.py", "toy.py", "ablate.py"):
        argv += ["--out", str(tmp_path / "out")]
    args = make().parse_args(argv)
    inside = all(ok(getattr(args, dest), args) for f, ok, _ in table if f == dest)
    if inside:  # in its domain (1e300 steps is a number of steps): not a refusal case
        assert not (isinstance(getattr(args, dest), float) and not math.isfinite(getattr(args, dest))), \
            f"{tool} {flag} {value}: a number that is not finite passed its domain"
        return
    line = refusal(main, argv, capsys)
    assert line.startswith(f"error: {flag} "), line


def test_a_flag_of_another_method_is_refused_for_every_method(capsys, tmp_path):
    """Each method flag, given with each method that does not read it: one line naming the methods that do."""
    for dest, applies in flags.METHOD_FLAGS.items():
        action = next(a for a in flags.parser()._actions if a.dest == dest)
        flag = action.option_strings[-1]
        value = [] if isinstance(action, SWITCHES) else [action.choices[0] if action.choices else
                                                          "x.csv" if dest in ("videos", "captions") else "1"]
        for method in flags.METHOD_NAMES:
            if applies(argparse.Namespace(method=method, grpo_kl_reference=None)):
                continue
            line = refusal(train.main, ["--model", "tiny", "--method", method, flag, *value,
                                        "--out", str(tmp_path / "x")], capsys)
            assert line.startswith(f"error: {flag} is read by --method ") and f"not by --method {method}" in line
