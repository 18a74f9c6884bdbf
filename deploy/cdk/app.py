#!/usr/bin/env python3
"""cdk entry point: reads config.json (or $SPLICEGATE_CDK_CONFIG) and synthesizes one stack."""

import os
import sys

import aws_cdk as cdk

from splicegate_fleet.settings import Settings, SettingsError
from splicegate_fleet.stack import SplicegateFleetStack


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("SPLICEGATE_CDK_CONFIG", os.path.join(here, "config.json"))
    try:
        settings = Settings.load(path)
    except SettingsError as e:
        sys.exit(f"config.json: {e}")
    env = None
    if settings.account or settings.region:
        env = cdk.Environment(account=settings.account, region=settings.region)
    app = cdk.App()
    SplicegateFleetStack(app, settings.stack_name, settings=settings, env=env)
    app.synth()


if __name__ == "__main__":
    main()
