"""The terminal chat client (speaks HTTP only, never imports the engine)."""
