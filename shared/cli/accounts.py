"""Creating users and agents (the operator's side, used by `callctl`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from shared.core.models import Agent, User
from shared.core.tokens import hash_token, new_api_token
from shared.core.uow import UnitOfWorkFactory


@dataclass(frozen=True)
class NewUser:
    user: User
    api_token: str  # the only time the token exists in clear


def create_user(uow_factory: UnitOfWorkFactory, email: str, credits: int, max_concurrent_calls: int) -> NewUser:
    token = new_api_token()
    with uow_factory() as uow:
        user = User(
            email=email,
            api_token_hash=hash_token(token),
            credits=credits,
            max_concurrent_calls=max_concurrent_calls,
        )
        uow.session.add(user)
        try:
            uow.commit()
        except IntegrityError as exc:
            raise ValueError(f"a user with email {email} already exists") from exc
    return NewUser(user, token)


def create_agent(uow_factory: UnitOfWorkFactory, user_id: uuid.UUID, name: str, provider_agent_id: str | None) -> Agent:
    with uow_factory() as uow:
        if uow.session.get(User, user_id) is None:
            raise LookupError(f"no user {user_id}")
        agent = Agent(user_id=user_id, name=name, provider_agent_id=provider_agent_id)
        uow.session.add(agent)
        uow.commit()
    return agent
