"""Request checks shared by the Jupyter handlers and the standalone server."""
