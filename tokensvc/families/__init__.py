"""The refresh-token format: token strings, their MAC over (session, generation),
sealed grace-window successors and keyed subject tags. Pure functions, no I/O.

Owns: ``tokens``.
May import: errors only (it is a leaf).
"""
