"""The ways in for people: the diagql command, the REPL with its completion, highlighting and
dot commands (docs/ARCHITECTURE.md, "shell")."""
