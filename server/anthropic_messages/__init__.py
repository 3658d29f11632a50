"""The Anthropic Messages API (/v1/messages) over the one chat generation path."""
