"""LangChain integration for cycles."""
