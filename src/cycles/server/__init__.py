"""The Cycles server: the runtime API (/v1) and the admin API (/v1/admin) over a ledger, as a Starlette app.

    from cycles.server import create_app
    app = create_app(ledger, admin_api_key="...")        # or: uvicorn --factory cycles.server:app_from_env

Needs the `server` extra (starlette, uvicorn).
"""

from .app import app_from_env, create_app

__all__ = ["create_app", "app_from_env"]
