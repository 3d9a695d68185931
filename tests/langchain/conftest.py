"""The LangChain integration runs on the shared integration fixtures (tests/integrations.py): a real Client, embedded or
over real HTTP on loopback, on the test's clock."""

from ..integrations import client, funded, ledger, recording_client, set_caps  # noqa: F401
