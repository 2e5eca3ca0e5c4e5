"""Errors of the index package, each a sentence a person can act on."""


class IndexProblem(Exception):
    """Base class for index errors."""


class IndexMissing(IndexProblem):
    """No index has been written at that place."""


class ModelMismatch(IndexProblem):
    """The index was built with other weights than the model asked to search it."""


class EmptyIndex(IndexProblem):
    """The index holds no items, so there is nothing to search."""


class ItemNotFound(IndexProblem):
    """No item of the collection has that id."""


class DuplicateExternalId(IndexProblem):
    """Another item of the collection already carries that external id."""


class IndexCorrupt(IndexProblem):
    """The item database cannot be read; the index is refused rather than served empty."""
