"""OpenAI-compatible serving of the sampler: `ChatEngine`, `create_app`, `ServerThread`, `BatchQueue`.

Importing this starts nothing; `launch/serve.py` is the command-line server.
"""
from klong_jax.serving.app import ChatEngine, ServerThread, create_app
from klong_jax.serving.batching import BatchQueue

__all__ = ["BatchQueue", "ChatEngine", "ServerThread", "create_app"]
