"""ALLOW_WITH_CAPS tool lists are applied by the guard itself: a `tool.*` action the caps exclude never runs."""

import pytest

import cycles

from .helpers import CENT, assert_settled


@pytest.fixture
def capped(client):
    client.policies.create("agent:*", caps={"tool_allowlist": ["search"], "max_tokens": 100})
    return client


def test_excluded_tool_is_refused_and_its_hold_released(capped):
    ran = []
    with pytest.raises(cycles.ToolNotAllowed) as denied:
        with capped.reserve(cycles.usd(0.05), action=("tool.call", "shell"), agent="bot"):
            ran.append(True)
    assert ran == []
    assert isinstance(denied.value, cycles.BudgetDenied) and denied.value.details["tool"] == "shell"
    assert_settled(capped, 0)


def test_allowed_tool_runs_with_the_caps(capped):
    with capped.reserve(cycles.usd(0.05), action=("tool.call", "search"), agent="bot") as r:
        assert r.decision == "ALLOW_WITH_CAPS" and r.caps.max_tokens == 100
    assert_settled(capped, 5 * CENT)


def test_tool_inside_a_run_inherits_the_run_caps(capped):
    @cycles.guard(estimate=cycles.usd(0.01), action=("tool.call", "shell"), client=capped)
    def shell():
        raise AssertionError("ran")

    with cycles.run(limit=cycles.usd(0.10), client=capped, agent="bot") as run:
        with pytest.raises(cycles.ToolNotAllowed):
            shell()
    assert run.spent == 0
    assert_settled(capped, 0)


def test_non_tool_actions_are_not_subject_to_tool_lists(capped):
    with capped.reserve(cycles.usd(0.05), action=("llm.completion", "shell"), agent="bot") as r:
        assert r.status == "ACTIVE"
    assert_settled(capped, 5 * CENT)
