"""Embeddings made searchable and kept: a gallery of items, the item store the truth (SQLite, or
PostgreSQL), FAISS derived.

- gallery.py     GalleryIndex: open, add, delete, search, snapshot; one lock over the store + FAISS
- items.py       StoredItems: what the store answers alone (items, hashes, labels, classes)
- search.py      the k nearest stored items of embeddings, and near-duplicates of new ones
- store.py       BaseItemStore: items, embeddings and the change log; the queries both stores share
- sqlite_store.py  ItemStore: the same in SQLite (a collection's items.sqlite, the default)
- pg_store.py    PostgresItemStore: the same in PostgreSQL; its schema's migrations; NOTIFY
- database.py    Database: the PostgreSQL URL and schema of a collection's items
- follower.py    ChangeFollower: a replica's index kept up with the others' writes
- vectors.py     VectorIndex: the FAISS index of one kind, with deleted ids it cannot remove hidden
- kinds.py       which FAISS kind (Flat, HNSW, IVF-PQ) for a size and memory limit; building,
                 training, tuning, and every look inside FAISS's wrappers
- recovery.py    keeping FAISS level with SQLite: at load, after each change, and rebuilds
- snapshot.py    FAISS snapshot files and when they are taken
- folder.py      a collection's folder (or database): opening its store, swapping in a rebuilt one
- uploads.py     uploaded images kept under images/, or in an object store (fsspec)
- duplicates.py  near-duplicate matching of added images
- locks.py       the readers-writer lock
- errors.py      the package's errors
"""
