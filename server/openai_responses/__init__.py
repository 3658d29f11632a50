"""The OpenAI Responses API (/v1/responses) over the one chat generation path."""
