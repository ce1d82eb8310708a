"""Host preflight: facts read in one round trip, pure checks, and the step that stops a run before any change."""
