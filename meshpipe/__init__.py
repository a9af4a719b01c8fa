"""meshpipe: an OpenAI-compatible gateway over a pipeline of model stages linked by QUIC."""

__version__ = "0.1.0"
