"""Small example datasets and scorer functions shipped with the package, for tests, docs and first runs."""
