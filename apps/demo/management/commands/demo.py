"""`manage.py demo`: run the whole federated loop on this machine, then keep the console up until Ctrl-C.

The command re-executes itself with the embedded mode's environment (SQLite, embedded bus and artifacts under
var/demo/, broker-less Celery), so the settings of this process and of every process it starts agree.
"""

import os
import shutil
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.demo.bootstrap import BootstrapConfig
from apps.demo.devices import EdgeTrainingPlan
from apps.demo.environment import DemoPaths, demo_environment, running_in_demo_environment
from apps.demo.processes import DemoError, free_port
from apps.demo.progress import Progress
from apps.demo.run import Demo, DemoOptions


class Command(BaseCommand):
    help = (
        "Run the federated loop end to end on this machine: v1 as champion, edge devices in different domains, "
        "rounds of train → aggregate → evaluate → approve → move; then serve the console until Ctrl-C."
    )
    # The outer process only re-executes itself; checks run in the demo's own process (against its database).
    requires_system_checks = ()

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--no-serve", action="store_true", help="exit after the summary instead of serving")
        parser.add_argument("--port", type=int, default=8000, help="HTTP port (a free one is picked if taken)")
        parser.add_argument("--devices", type=int, default=3, help="simulated edge devices, 3-5 (default 3)")
        parser.add_argument("--rounds", type=int, default=2, help="candidates to build and approve (default 2)")
        parser.add_argument("--pretrain-steps", type=int, default=BootstrapConfig.pretrain_steps)
        parser.add_argument("--edge-steps", type=int, default=EdgeTrainingPlan.max_steps, help="steps per device round")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--ewc-lambda",
            type=float,
            default=DemoOptions.ewc_lambda,
            help="EWC strength the rounds ask the devices for (0: rounds without safeguards)",
        )
        parser.add_argument(
            "--gate-max-increase",
            type=float,
            default=DemoOptions.gate_max_increase,
            help="nats an untrained (protected) domain may get worse before the promotion gate holds a candidate",
        )
        parser.add_argument("--step-timeout", type=float, default=900.0, help="seconds any one step may take")
        parser.add_argument("--dir", type=Path, default=None, help="demo folder (default: var/demo, wiped first)")

    def handle(self, *args: Any, **options: Any) -> None:
        paths = DemoPaths((options["dir"] or Path(settings.BASE_DIR) / "var" / "demo").resolve())
        if not running_in_demo_environment(paths):
            self._reexecute(paths, options)
        try:
            demo_options = DemoOptions(
                root=paths.root,
                port=free_port(options["port"]),
                devices=options["devices"],
                rounds=options["rounds"],
                serve=not options["no_serve"],
                step_timeout_s=options["step_timeout"],
                bootstrap=BootstrapConfig(seed=options["seed"], pretrain_steps=options["pretrain_steps"]),
                edge=EdgeTrainingPlan(max_steps=options["edge_steps"]),
                ewc_lambda=options["ewc_lambda"],
                gate_max_increase=options["gate_max_increase"],
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        try:
            Demo(demo_options, paths, dict(os.environ), Progress(self.stdout)).run()
        except DemoError as error:
            raise CommandError(str(error)) from None

    def _reexecute(self, paths: DemoPaths, options: dict[str, Any]) -> None:
        """Start clean (wipe the demo folder) and replace this process with one running under the demo's settings."""
        if paths.root.exists():
            shutil.rmtree(paths.root)
        paths.root.mkdir(parents=True)
        env = demo_environment(os.environ, paths)
        argv = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "demo", *sys.argv[2:]]
        if options["dir"] is None:
            argv += ["--dir", str(paths.root)]
        self.stdout.flush()
        os.execve(sys.executable, argv, env)
