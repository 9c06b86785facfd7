"""What DiagQL reads from the user's model and data: items by index, hooks, the layer catalog
and the profile (docs/ARCHITECTURE.md, "the model side")."""
