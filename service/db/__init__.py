"""Persistence: ORM models, sessions, migrations and one module per table family (no HTTP
types and no faiss here). The functions are re-exported: ``from service import db``."""

from service.db.api_keys import (
    KEY_PREFIX,
    authenticate,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from service.db.index_versions import (
    activate_index,
    active_index_version,
    list_index_versions,
    register_index_version,
    sync_index_versions,
)
from service.db.locks import IndexBuildLockedError, index_build_lock
from service.db.predictions import (
    FeedbackSample,
    add_feedback,
    feedback_sample,
    get_prediction,
    record_prediction,
)
from service.db.schema import (
    SchemaNotAtHeadError,
    check_at_head,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from service.db.session import (
    check_writable,
    display_url,
    error_line,
    make_engine,
    make_sessionmaker,
    wait_for_database,
)

__all__ = [
    "KEY_PREFIX",
    "FeedbackSample",
    "IndexBuildLockedError",
    "SchemaNotAtHeadError",
    "activate_index",
    "active_index_version",
    "add_feedback",
    "authenticate",
    "check_at_head",
    "check_writable",
    "create_api_key",
    "current_revision",
    "display_url",
    "downgrade",
    "error_line",
    "feedback_sample",
    "get_prediction",
    "head_revision",
    "index_build_lock",
    "list_api_keys",
    "list_index_versions",
    "make_engine",
    "make_sessionmaker",
    "record_prediction",
    "register_index_version",
    "revoke_api_key",
    "sync_index_versions",
    "upgrade",
    "wait_for_database",
]
