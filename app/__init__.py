"""The service and the command line, above `models` and `index`.

- `main` (app factory and lifespan), `service` (what is loaded), `settings` (IMGSIM_*)
- `routes/`, `schemas`, `dependencies`, `errors` (domain errors -> HTTP status codes)
- `stages` (train, index, eval, serve, demo as plain functions), `cli` and `options` (the
  imgsim command, its options generated from the training config)
"""
