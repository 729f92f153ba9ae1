"""The nouns every layer shares: sampling params, token logprobs, the engine config, and
the wire (each boundary's messages and tables, the typed channel, CURVE on tcp).

A leaf: nothing here imports anything else of ours, so models/, kv_transfer/ and the
workers use these without importing the engine (tests/test_layers.py keeps it so).
"""
