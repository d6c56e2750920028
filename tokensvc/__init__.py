"""tokensvc: the token service of the mesh (server package)."""

__version__ = "0.1.0"
