"""Planning and executing queries: plans, forward passes, aggregate states, estimates and
metrics (docs/ARCHITECTURE.md, "plan" and "execute")."""
