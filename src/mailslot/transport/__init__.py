"""Transports: the HTTP app and the WebSocket tunnel that carries the same API."""
