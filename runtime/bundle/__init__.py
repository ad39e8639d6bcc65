"""Bundle trust: a bundle read, its manifest checked against the schema, its artifacts verified by hash (and the
hashes found good remembered), its signature checked."""
