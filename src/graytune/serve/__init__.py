"""The owner's service: a hidden backbone lent over HTTP to many clients (``graytune serve``).

Example:
    >>> app = create_app(open_backbone("minilm", "dark-gray"), ServeConfig(), ApiKeys.load("keys.txt"))
"""

from graytune.serve.app import create_app
from graytune.serve.config import ApiKeys, ServeConfig
from graytune.serve.sessions import SessionStore

__all__ = ["ApiKeys", "ServeConfig", "SessionStore", "create_app"]
