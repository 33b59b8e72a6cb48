"""tollgate: an LLM gateway as a mitmproxy addon."""
