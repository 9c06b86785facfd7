"""A connection: one model and one data set, the statements it answers and the settings SET
changes (docs/ARCHITECTURE.md, "session")."""
