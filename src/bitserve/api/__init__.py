"""The HTTP API: FastAPI app factory, wire types, routes, SSE, auth, errors."""
