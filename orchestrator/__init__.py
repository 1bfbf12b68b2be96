"""The chat product: conversations and responses on a store, in front of the engine.

`Product.open(engine, database_url)` builds it; the server's routes call its services.
Layers: `store/` (the only SQL), `context` (items -> prompt), `events` (the Responses
event stream and the state it builds), `response_request` (a request and its checks),
`responses` (the service: create, retrieve, cancel, delete), `turn` (one response's
state machine) and `conversations`. See docs/product.md.

The public names are imported lazily (as `engine`'s and `server`'s are), so that a tool
that needs one light module (the admin CLI, `orchestrator.admin`, on the store alone)
does not import the engine and torch with the product.
"""

from engine.lazy_exports import lazy_getattr

_EXPORTS = {
    "LOCAL_USER": "orchestrator.accounts",
    "Accounts": "orchestrator.accounts",
    "ConversationService": "orchestrator.conversations",
    "FileService": "orchestrator.files",
    "FunctionTool": "orchestrator.response_request",
    "InvalidRequestError": "orchestrator.errors",
    "NotFoundError": "orchestrator.errors",
    "Page": "orchestrator.store",
    "Product": "orchestrator.product",
    "ProductError": "orchestrator.errors",
    "ResponseRequest": "orchestrator.response_request",
    "ResponseService": "orchestrator.responses",
    "VectorStoreService": "orchestrator.vector_stores",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
