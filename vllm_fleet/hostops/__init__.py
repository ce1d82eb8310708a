"""One-fact pyinfra operations and facts shared by the steps (many paths, one round trip)."""
