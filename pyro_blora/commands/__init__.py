"""Command modules of the ``pyro-blora`` CLI; each exposes ``register(app)``."""
