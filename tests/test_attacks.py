"""The attack battery's machinery (diffrt.bench.attacks), on a few cheap attacks, not the whole battery: a hang is
classified as a hang (its worker killed at the timeout, the next attack served by a fresh one), a traceback from
a command is detected, a return where a refusal was due is silently wrong, and a message is judged by the words
it must hold."""
from __future__ import annotations

import sys

from diffrt.bench import attacks
from diffrt.bench.attacks import Attack


def _attack(name: str, probe: str, args: tuple, expect: tuple[str, ...] = (), timeout: float = 30.0) -> Attack:
    return Attack(name, "silently-wrong", "api", probe, args, expect, timeout)


def test_the_runner_classifies_a_hang_a_traceback_and_messages():
    rows = attacks.run_attacks([
        _attack("hangs", "call", ("time:sleep", (600,)), timeout=2.0),
        _attack("refused well", "call", ("math:sqrt", (-1.0,)), ("domain",)),
        _attack("refused poorly", "call", ("math:sqrt", (-1.0,)), ("argument x",)),
        _attack("accepted", "call", ("math:sqrt", (4.0,)), ("domain",)),
        _attack("a crash", "call", ("operator:getitem", ([], 3))),
        _attack("traceback", "cli_subprocess", ([sys.executable, "-c", "import json; json.loads('{')"],)),
        _attack("one line", "cli_subprocess", ([sys.executable, "-c", "import sys; sys.exit('error: --steps must be "
                                                                     ">= 1')"],), ("--steps",)),
    ])
    verdicts = {row["id"]: row["verdict"] for row in rows}
    assert verdicts == {"hangs": "hang", "refused well": "ok", "refused poorly": "poor-message",
                        "accepted": "silently-wrong", "a crash": "traceback", "traceback": "traceback",
                        "one line": "ok"}
    assert "no answer within 2 s" in rows[0]["detail"]
    assert "JSONDecodeError" in rows[5]["detail"]


def test_cli_judgement():
    attack = _attack("cli", "cli_in_process", ([],), ("--steps",))
    refused = "diffrt sample: error: argument --steps: 0 is out of range\n"
    assert attacks.judge_cli(attack, 2, "", refused).verdict == "ok"
    assert attacks.judge_cli(attack, 0, "ran 20 steps", "").verdict == "silently-wrong"
    assert attacks.judge_cli(attack, 2, "", "diffrt: error: something failed\n").verdict == "poor-message"
    assert attacks.judge_cli(attack, 1, "", "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n").verdict \
        == "traceback"
    assert attacks.judge_message("steps: " + "9" * 5000, ("steps",)).verdict == "poor-message"  # too long


def test_the_tables_make_a_few_hundred_attacks_with_unique_ids():
    full, quick = attacks.build_attacks(), attacks.build_attacks(quick=True)
    assert len(full) >= 300 and 10 <= len(quick) <= 40 and set(a.id for a in quick) <= set(a.id for a in full)
    assert len({a.id for a in full}) == len(full)
    assert {a.surface for a in full} == set(attacks.SURFACES) and {a.cls for a in full} == set(attacks.CLASSES)
    assert all(hasattr(attacks, a.probe) for a in full)
    options = {(a.args[0][0], a.id.split()[1].split("=")[0]) for a in full if a.probe == "cli_in_process"}
    assert {("serve", "--max-body-bytes"), ("serve", "--stream-idle-timeout-s"), ("bench", "--repeats")} <= options
