"""Client-side reference code: what a client author reads to talk to Mailslot's own services."""
