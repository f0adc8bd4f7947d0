"""System-level benchmarks that exercise more than one component (kept out of the components)."""
