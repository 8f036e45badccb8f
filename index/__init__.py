"""Galleries, FAISS indexes and geography helpers (the only package that calls faiss and h3)."""
