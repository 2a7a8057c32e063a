"""Verdicts of the diagnostics (pure logic)."""

from chadthrottle import names, verdict
from chadthrottle.verdict import Window


def test_unlimited():
    assert verdict.classify(Window(0, 5e6, 10, 0)) == names.STATUS_UNLIMITED


def test_throttled_near_limit():
    assert verdict.classify(Window(51200, 49000, 100, 20)) == names.STATUS_THROTTLED
    assert verdict.classify(Window(51200, 0, 0, 0)) == names.STATUS_THROTTLED  # idle


def test_not_working_over_one_and_a_half():
    assert verdict.classify(Window(51200, 358000, 900, 12)) == names.STATUS_NOT_WORKING


def test_not_dropping_over_limit_without_drops():
    assert verdict.classify(Window(51200, 80000, 900, 0)) == names.STATUS_NOT_DROPPING


def test_program_not_called_while_sockets_move_bytes():
    w = Window(51200, 0, 0, 0, socket_rate=350000)
    assert verdict.classify(w) == names.STATUS_PROGRAM_NOT_CALLED
    assert verdict.ratio(w) > 6


def test_worst_direction_wins():
    assert verdict.worst([names.STATUS_THROTTLED, names.STATUS_UNLIMITED]) == \
        names.STATUS_THROTTLED
    assert verdict.worst([names.STATUS_THROTTLED, names.STATUS_NOT_WORKING]) == \
        names.STATUS_NOT_WORKING
    assert verdict.worst([names.STATUS_UNLIMITED] * 2) == names.STATUS_UNLIMITED
