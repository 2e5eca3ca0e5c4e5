"""Where a collection's items live when not in its folder: a PostgreSQL database and schema."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Database:
    """A PostgreSQL database that holds a collection's items in place of its folder's
    items.sqlite: the URL, and the schema of the collection's tables."""

    url: str
    schema: str = "imgsim"
    replaces: str | None = None  # the schema of the collection this one is built to replace

    def __str__(self) -> str:
        """The URL without its password, and the schema: for messages and logs."""
        parts = urlsplit(self.url)
        shown = self.url
        if parts.password is not None:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            shown = parts._replace(netloc=netloc).geturl()
        return f"{shown} (schema {self.schema})"

    def staging(self) -> Database:
        """Where this process builds a collection that replace_directory then puts in place
        of this one."""
        return replace(self, schema=f"{self.schema}_building_{os.getpid()}", replaces=self.schema)
