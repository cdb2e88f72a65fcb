"""Who is calling, and what they may do: API keys, JWTs, client certificates and scopes."""
