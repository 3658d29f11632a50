"""deltaserve's engine and OpenAI-compatible HTTP server."""
