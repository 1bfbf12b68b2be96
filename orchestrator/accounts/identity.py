"""Who a request acts for."""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator.store.accounts import UserRow

# The owner of everything stored by requests that name no user: an open server (no keys
# issued) and the operator's `--api-key` keys.
LOCAL_USER = "user_local"


@dataclass(frozen=True)
class Identity:
    """The owner id stored objects carry, the user (None: the local user, or an admin
    `--api-key`, neither of which has limits) and the key the request presented."""

    owner: str = LOCAL_USER
    user: UserRow | None = None
    key_id: str | None = None

    @property
    def user_id(self) -> str | None:
        return None if self.user is None else self.user.id

    @property
    def name(self) -> str | None:
        return None if self.user is None else self.user.name

    @classmethod
    def of(cls, user: UserRow, key_id: str | None) -> Identity:
        return cls(user.id, user, key_id)


LOCAL = Identity()


def cache_salt(owner: str, requested: str | None = None) -> str | None:
    """The engine's prefix-cache namespace for `owner`'s requests (SamplingParams.cache_salt):
    each user's own, so one user's prompts neither serve nor reveal another's through
    `cached_tokens` or timing; the local user's (an open server, admin keys), none.
    `requested` (a request's own `cache_salt`, vLLM's) narrows it to the requests of
    that owner with that salt: the pair is encoded unambiguously (a JSON array, which no
    owner id is), so it can never widen sharing to another owner."""
    own = None if owner == LOCAL_USER else owner
    return own if requested is None else json.dumps([own, requested])
