"""`duet bench serve`: a load generator for any OpenAI-compatible server, after vLLM's."""
