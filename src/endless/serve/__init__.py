"""``endless serve``: an OpenAI-compatible HTTP server over endless streams.

``batch.py`` decodes several streams in one forward pass; ``sessions.py`` maps conversation ids to
live streams (LRU, saved to a folder); ``engine.py`` is the one worker that owns the model, queues
requests and batches their decoding; ``protocol.py`` parses and checks the OpenAI request bodies;
``app.py`` is the FastAPI application; ``static/index.html`` the chat page. FastAPI and uvicorn
are the optional extra ``[serve]``: nothing here is imported by the rest of the package.
"""
