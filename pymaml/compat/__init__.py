"""Drop-in replacements for other meta-learning libraries' APIs (pymaml.compat.learn2learn)."""
