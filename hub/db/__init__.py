"""The hub's database: typed models, the session life cycle and schema migrations."""

from hub.db.models import (
    ApiToken,
    Base,
    Crop,
    Device,
    Model,
    ProductClass,
    Result,
    Review,
    Rollout,
    Site,
    Station,
    User,
)
from hub.db.session import Database, SchemaError, check_schema, upgrade

__all__ = [
    "ApiToken",
    "Base",
    "Crop",
    "Database",
    "Device",
    "Model",
    "ProductClass",
    "Result",
    "Review",
    "Rollout",
    "SchemaError",
    "Site",
    "Station",
    "User",
    "check_schema",
    "upgrade",
]
