"""End-to-end runs with their acceptance checks, tables and plots: the demo on the embedded family,
the SmolLM2 study, and the throughput benchmark; ``common`` holds what they share."""
