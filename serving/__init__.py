"""The LitServe app that serves a trained model: OpenAI-compatible generation with continuous
batching, introspection and tokenization. Start it with `python -m serving --help`; the design is
described in serving/app.py."""
