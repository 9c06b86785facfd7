"""The language: the typed syntax tree, the parser that builds it from text, and the binder
that resolves its names against a model (docs/ARCHITECTURE.md, "parse" and "bind")."""
