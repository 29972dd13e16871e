"""Ways to run pagedjax as a service (``engine.entrypoints.openai``: the OpenAI-compatible server).

Nothing is imported here: the server's dependencies (fastapi, uvicorn, prometheus-client)
load only when a server module is imported.
"""
