"""The OpenAI-compatible HTTP server: ``api_server`` (app, endpoints, command line) and
``protocol`` (the wire format). Nothing is imported here, so ``protocol`` can be used
without fastapi or uvicorn installed.
"""
