"""Pure tensor functions of the 2025 methods, one module per method: no state, no loading, no registries."""
