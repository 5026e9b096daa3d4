"""The pieces behind ``python -m llm.serve``: the batching scheduler (``scheduler``, no HTTP in it) and the
OpenAI-compatible FastAPI app that feeds it (``api``). The command itself is llm/serve.py."""
