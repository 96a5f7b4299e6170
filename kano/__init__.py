"""Kano's bottom layer: the version, the user-facing error type and terminal helpers.

Every other package may import from here; nothing here imports another Kano package, so no
package imports upward from the command line (`cli.py`).
"""

__version__ = "0.1.0"
