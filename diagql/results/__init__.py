"""The answer of a statement and its forms: the Result type, rich/JSON/CSV rendering and plots
(docs/ARCHITECTURE.md, "results")."""
