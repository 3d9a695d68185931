"""OpenTelemetry spans of the guard, read back with the SDK's in-memory exporter (the `dev` extra)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import cycles
from cycles import telemetry

sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once: OpenTelemetry allows one) exporting to memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_cycles_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        provider._cycles_test_exporter = True  # type: ignore[attr-defined]
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture
def client(tmp_path) -> Iterator[cycles.Client]:
    c = cycles.Client(store=f"sqlite:///{tmp_path / 'c.db'}", tenant="acme", journal=False)
    c.budgets.set("tenant:acme", cycles.usd(1))
    c.budgets.set("tenant:acme/agent:bot", cycles.usd(0.10))
    yield c
    c.close()


def by_name(exporter: InMemorySpanExporter) -> dict[str, dict]:
    return {s.name: dict(s.attributes) for s in exporter.get_finished_spans()}


def test_reserve_and_commit_spans(spans, client):
    with cycles.scope(agent="bot"):
        with client.reserve(cycles.usd(0.05), action=("tool.search", "web")) as r:
            r.commit(cycles.usd(0.03))
    got = by_name(spans)
    reserve, commit = got["cycles.reserve"], got["cycles.commit"]
    assert reserve == {
        "cycles.reservation.id": r.id, "cycles.reservation.decision": "ALLOW",
        "cycles.reservation.unit": "USD_MICROCENTS", "cycles.reservation.amount.estimate": 5_000_000,
        "cycles.reservation.scope": "tenant:acme/agent:bot",
    }  # fmt: skip
    assert commit["cycles.reservation.id"] == r.id and commit["cycles.reservation.amount.actual"] == 3_000_000
    assert not any(k.startswith("gen_ai.") for k in commit)  # not a model call


def test_a_denial_is_an_error_span_with_its_reason(spans, client):
    with pytest.raises(cycles.BudgetExceeded), cycles.scope(agent="bot"):
        with client.reserve(cycles.usd(0.50), action=("tool.search", "web")):
            pass
    (span,) = spans.get_finished_spans()
    assert span.name == "cycles.reserve" and span.status.status_code == trace.StatusCode.ERROR
    attrs = dict(span.attributes)
    assert attrs["cycles.reservation.decision"] == "DENY"
    assert attrs["cycles.reservation.reason_code"] == "BUDGET_EXCEEDED"
    assert attrs["cycles.reservation.scope"] == "tenant:acme/agent:bot"
    assert [e.name for e in span.events] == ["exception"]


def test_a_failed_call_is_a_release_span(spans, client):
    with pytest.raises(RuntimeError), client.reserve(cycles.usd(0.01), action=("tool.search", "web")):
        raise RuntimeError("the tool broke")
    release = by_name(spans)["cycles.release"]
    assert release["cycles.reservation.amount.actual"] == 0


def test_model_calls_carry_the_genai_attributes(spans, client):
    pytest.importorskip("langchain_core")
    from cycles_langchain import CyclesCallbackHandler

    from ..langchain.fakes import UsageChatModel

    model = UsageChatModel()
    model.invoke("hello there", config={"callbacks": [CyclesCallbackHandler(client=client, agent="bot")]},
                 max_tokens=64)  # fmt: skip
    (usage,) = model.usages
    commit = by_name(spans)["cycles.commit"]
    assert commit["gen_ai.request.model"] == "gpt-4o-mini" and commit["gen_ai.operation.name"] == "chat"
    assert commit["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert commit["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    assert commit["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    reserve = by_name(spans)["cycles.reserve"]
    assert reserve["gen_ai.request.model"] == "gpt-4o-mini" and "gen_ai.usage.input_tokens" not in reserve


def test_without_opentelemetry_nothing_is_imported(tmp_path):
    """A process where opentelemetry cannot be imported: guarded calls work, and no opentelemetry module loads."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def no_otel(name, *a, **k):\n"
        "    if name.startswith('opentelemetry'): raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = no_otel\n"
        "import cycles\n"
        f"c = cycles.Client(store='sqlite:///{tmp_path / 'x.db'}', tenant='t', journal=False)\n"
        "c.budgets.set('tenant:t', cycles.usd(1))\n"
        "with c.reserve(cycles.usd(0.1)) as r: r.commit(cycles.usd(0.05))\n"
        "from cycles import telemetry\n"
        "assert telemetry.tracer() is None and telemetry.start('reserve') is None\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], sys.modules.keys()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_tracer_is_cached(spans):
    assert telemetry.tracer() is telemetry.tracer()
