"""Embeddings made searchable and kept: a gallery of items, SQLite the truth, FAISS derived.

- gallery.py     GalleryIndex: open, add, delete, search, snapshot; one lock over SQLite + FAISS
- store.py       ItemStore: items, embeddings and the change log in SQLite
- vectors.py     VectorIndex: the FAISS index of one kind, with deleted ids it cannot remove hidden
- kinds.py       which FAISS kind (Flat, HNSW, IVF-PQ) for a size and memory limit; building,
                 training, tuning, and every look inside FAISS's wrappers
- recovery.py    keeping FAISS level with SQLite: at load, after each change, and rebuilds
- snapshot.py    FAISS snapshot files and when they are taken
- folder.py      a collection's folder: its files, opening its store, swapping in a rebuilt one
- uploads.py     uploaded images kept under images/
- duplicates.py  near-duplicate matching of added images
- locks.py       the readers-writer lock
- errors.py      the package's errors
"""
