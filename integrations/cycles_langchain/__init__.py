"""cycles for LangChain: hard budgets around chains, chat models, LLMs and tools.

    import cycles
    from cycles_langchain import CyclesCallbackHandler, guard_model, guard_tool

    handler = CyclesCallbackHandler(agent="bot")                 # every model (and, opted in, tool) call reserved
    chain.invoke(x, config={"callbacks": [handler]})             # a denial raises before the provider is called

    tools = [guard_tool(t, estimate=cycles.usd(0.01)) for t in tools]    # same name, description and schema
    model = guard_model(ChatOpenAI(model="gpt-4o-mini"))                 # applies ALLOW_WITH_CAPS max_tokens

    with cycles.run(limit=cycles.usd(0.50)):                    # the whole agent run under one limit
        agent_loop(...)

Model calls are priced with `cycles.pricing` from LangChain's `usage_metadata`. Per-run subject fields go in the
config metadata: `config={"callbacks": [handler], "metadata": {"cycles_agent": "planner"}}` (keys `cycles_<level>`,
`cycles_scope`, `cycles_dimensions`). See the module docstrings of `callbacks`, `tools` and `model` for the lifecycle
on every path (batch, streams closed early, errors, caps).
"""

from cycles.errors import ToolNotAllowed

from .callbacks import CyclesCallbackHandler
from .model import GuardedModel, guard_model
from .tools import GuardedTool, guard_tool

__all__ = [
    "CyclesCallbackHandler",
    "GuardedModel",
    "GuardedTool",
    "ToolNotAllowed",
    "guard_model",
    "guard_tool",
]
