"""The product's fixtures (a served app with a real store, each database) for the page's
in-process tests."""

from tests.product.conftest import database_url, product_server  # noqa: F401
