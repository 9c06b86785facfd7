"""EVALUATE SAMPLERS: the paper's S1/S2/S3 workload benchmark as one statement
(docs/ARCHITECTURE.md, "evaluate")."""
