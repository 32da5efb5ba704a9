"""Interpretability: which attention heads a model uses to answer, and how that differs between
reasoning over Stoney Nakoda and over math; everything is read at the answer slot (contexts.py)."""
