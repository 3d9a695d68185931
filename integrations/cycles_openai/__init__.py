"""cycles for the OpenAI SDK: a drop-in guarded `OpenAI` / `AsyncOpenAI`, and OpenAI Agents SDK run hooks.

    import openai
    from cycles_openai import guard

    client = guard(openai.OpenAI(), agent="bot")      # every chat / responses / embeddings call reserved first
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])    # a denial raises before it is sent

    from cycles_openai import OpenAI, Settings        # or the drop-in classes
    client = OpenAI(cycles=Settings(agent="bot"))

Calls are priced with `cycles.pricing` from the answers' `usage`; streams, retries, caps and raw responses are
described in `cycles_openai.client`. Agents SDK: `cycles_openai.agents` (`CyclesRunHooks` and its `tool_guardrail()`).
"""

from cycles.errors import ToolNotAllowed

from ._answers import StreamFailed
from .client import AsyncOpenAI, OpenAI, Settings, guard, openai_pricing

__all__ = ["AsyncOpenAI", "OpenAI", "Settings", "StreamFailed", "ToolNotAllowed", "guard", "openai_pricing"]
