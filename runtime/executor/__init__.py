"""How the engine core reaches its model ranks: in this process, or one process per rank."""
