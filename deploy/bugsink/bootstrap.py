# Bugsink's admin, the callflow team and its project: what `make up` (deploy/bugsink/setup.sh) and Docker Compose
# (the bugsink-setup job) both need. Run by `bugsink-manage shell --no-imports -c`; changes nothing when all exist.
#
# Env: ADMIN_PASSWORD  the admin's password when the admin is created
#      DSN             (Compose) the DSN the services are given: the project gets its key, and one already there must
#                      carry its key and id. A DSN whose host is not DSN_HOST names another Sentry: nothing to set up.
#      STATE           (make up) a directory where the project's DSN and a full-access API token are written
import os
from pathlib import Path
from urllib.parse import urlsplit

from django.contrib.auth import get_user_model

from bsmain.models import AuthToken
from phonehome.models import Installation
from projects.models import Project, ProjectMembership, ProjectRole
from teams.models import Team, TeamMembership, TeamRole

NAME = "callflow"
EMAIL = "admin@callflow.local"


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


dsn = urlsplit(os.environ["DSN"]) if os.environ.get("DSN") else None
if dsn is not None and dsn.hostname != os.environ.get("DSN_HOST"):
    print(f"SENTRY_DSN names {dsn.hostname}, not this Bugsink: nothing to set up")
    raise SystemExit(0)

users = get_user_model().objects
user = users.filter(username=EMAIL).first() or users.create_superuser(
    username=EMAIL, email=EMAIL, password=os.environ["ADMIN_PASSWORD"]
)
team, _ = Team.objects.get_or_create(name=NAME)
TeamMembership.objects.get_or_create(team=team, user=user, defaults={"role": TeamRole.ADMIN, "accepted": True})
project_defaults = {"team": team} if dsn is None else {"team": team, "sentry_key": dsn.username}
project, _ = Project.objects.get_or_create(name=NAME, defaults=project_defaults)
ProjectMembership.objects.get_or_create(
    project=project, user=user, defaults={"role": ProjectRole.ADMIN, "accepted": True}
)
# Local Bugsink sends no email on purpose: the banner asking to set it up would only be noise.
Installation.objects.filter(silence_email_system_warning=False).update(silence_email_system_warning=True)

if dsn is not None and (str(project.pk), str(project.sentry_key).replace("-", "")) != (
    dsn.path.strip("/"),
    dsn.username,
):
    raise SystemExit(f"SENTRY_DSN names project {dsn.path.strip('/')}, but Bugsink's DSN is {project.dsn}")
if os.environ.get("STATE"):
    state = Path(os.environ["STATE"])
    token = AuthToken.objects.filter(description=NAME).first() or AuthToken.create_full_access(description=NAME)
    write_if_changed(state / "dsn", project.dsn + "\n")
    write_if_changed(state / "api-token", token.token + "\n")
