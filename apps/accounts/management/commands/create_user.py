"""`manage.py create_user NAME --role ROLE [--token NAME]`: a user with a role, and optionally an API token."""

from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.accounts.choices import Role
from apps.accounts.services import create_user_with_role, issue_api_token
from apps.governance.actors import Actor


class Command(BaseCommand):
    help = "Create a user with a role (officer, engineer, device, admin); optionally print a new API token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument("--email", default="")
        parser.add_argument(
            "--password-file", type=Path, help="File holding the password (for session login); default: none."
        )
        parser.add_argument("--token", metavar="NAME", help="Also issue an API token with this name; printed once.")

    def handle(self, *args: Any, **options: Any) -> None:
        password = None
        if options["password_file"] is not None:
            try:
                password = options["password_file"].read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CommandError(f"--password-file {options['password_file']}: {exc}") from exc
        command = Actor.automation("manage.py create_user")
        try:
            user = create_user_with_role(
                username=options["username"],
                role=options["role"],
                email=options["email"],
                password=password,
                actor=command,
            )
            if options["token"]:
                _, plaintext = issue_api_token(user, actor=command, name=options["token"])
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc
        self.stderr.write(f"created {user.username} with role {user.role}")
        if options["token"]:
            # Only the token on stdout, so scripts can capture it: TOKEN=$(manage.py create_user …).
            self.stdout.write(plaintext)
