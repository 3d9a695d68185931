"""cycles for LlamaIndex: hard budgets around LLMs, agents, tools and embeddings.

    import cycles
    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager
    from cycles_llamaindex import CyclesCallbackHandler, guard_embedding, guard_tool

    Settings.callback_manager = CallbackManager([CyclesCallbackHandler(agent="bot")])   # every LLM call reserved
    tools = [guard_tool(t, estimate=cycles.usd(0.01)) for t in tools]                  # same metadata and schema
    Settings.embed_model = guard_embedding(OpenAIEmbedding())                           # embeddings too

    with cycles.run(limit=cycles.usd(0.50)):                    # a whole agent run under one limit
        await agent.run("...")

LLM calls are priced with `cycles.pricing` from the usage LlamaIndex responses carry. Per-call subject fields come
from `instrument_tags({"cycles_agent": "planner"})` (keys `cycles_<level>`, `cycles_scope`, `cycles_dimensions`).
See the module docstrings of `callbacks`, `tools` and `embeddings` for the lifecycle on every path.
"""

from cycles.errors import ToolNotAllowed

from .callbacks import CyclesCallbackHandler
from .embeddings import GuardedEmbedding, guard_embedding
from .tools import GuardedFunctionTool, GuardedTool, guard_tool

__all__ = [
    "CyclesCallbackHandler",
    "GuardedEmbedding",
    "GuardedFunctionTool",
    "GuardedTool",
    "ToolNotAllowed",
    "guard_embedding",
    "guard_tool",
]
