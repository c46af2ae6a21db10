"""Each test run gets its own PostgreSQL database and RabbitMQ vhost, so runs never collide."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
RABBITMQ_HOST_URL = "amqp://guest:guest@127.0.0.1:5672"


@dataclass(frozen=True)
class Isolation:
    name: str

    @classmethod
    def new(cls) -> Isolation:
        return cls(f"callflow_test_{uuid.uuid4().hex[:10]}")

    @property
    def database_url(self) -> str:
        return str(make_url(POSTGRES_ADMIN_URL).set(database=self.name).render_as_string(hide_password=False))

    @property
    def rabbitmq_url(self) -> str:
        return f"{RABBITMQ_HOST_URL}/{self.name}"

    def create(self) -> None:
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    def destroy(self) -> None:
        _rabbitmqctl("delete_vhost", self.name)
        drop_database(self.name)


def drop_database(name: str) -> None:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
