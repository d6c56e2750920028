"""Process ownership: address and data-directory locks, parent-death handling, and the
asyncio task helpers.

Owns: ``ownership``, ``tasks``.
May import: errors only (it is a leaf).
"""
