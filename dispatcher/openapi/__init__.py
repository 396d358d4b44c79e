"""The OpenAPI 3.1 document of the public HTTP API (`document.openapi_document`): its
operations, its component schemas and the pieces both are made of."""
