"""What outlives a statement: the disk cache, the fingerprints that key it, and the activation
store of sampled items (docs/ARCHITECTURE.md, "storage")."""
