"""Test access to the tiny model builders (they live in the package: the demo uses them too)."""

from worker.tinymodel import make_corpus, make_tiny_model, sentences

__all__ = ["make_corpus", "make_tiny_model", "sentences"]
