"""Statistics: pure functions, arrays in and plain dicts out, each tested against hand-computed values."""
