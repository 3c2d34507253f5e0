"""Mailslot: a self-hostable server for Signal-protocol messaging."""

__version__ = "0.1.0"
