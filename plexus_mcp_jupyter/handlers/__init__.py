"""Tornado handlers of the Jupyter extension: the MCP endpoint, REST API and health."""
