"""Cryptographic primitives: XEdDSA, key formats, salted token hashes.

Nothing here imports from other Mailslot layers.
"""
