"""The OpenAI-compatible HTTP layer: protocol models, one router per API family, the app factory and the server."""
