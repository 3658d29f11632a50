"""The OpenAI Responses API (/v1/responses) over the one chat generation path."""

from .router import responses_routes

__all__ = ["responses_routes"]
