"""`leptonc serve`: the OpenAI HTTP API, streaming and Prometheus metrics in front of the batching engine
(leptonc/runtime/batching.py). The HTTP layer only parses, streams and counts; the engine schedules."""
