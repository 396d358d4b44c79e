"""The HTTP side: module-level route handlers, the route table, request input, CORS and the
JSON error answers. `dispatcher.app.create_app` puts them together with the services."""
