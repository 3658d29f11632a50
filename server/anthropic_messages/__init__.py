"""The Anthropic Messages API (/v1/messages) over the one chat generation path."""

from .router import messages_routes

__all__ = ["messages_routes"]
