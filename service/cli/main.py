"""The `geoloc` command line: build and list indexes, locate images, evaluate.

One module per command or group of commands; this one builds the root app from them. Command
modules import only typer and the standard library at their top, so `geoloc --help` and the
commands that need no model (profiles, index list, db, apikey) start without torch or faiss.
"""

from __future__ import annotations

import typer

from service.cli import apikey, data, db, images, index, runtime
from service.cli.common import friendly_errors
from service.cli.eval import calibrate_cmd, eval_cmd
from service.cli.locate import locate_cmd
from service.cli.serve import serve_cmd
from service.cli.setup import setup_cmd
from service.cli.train import train_cmd

app = typer.Typer(
    help="geoloc: image geolocation (retrieval over a GPS gallery).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command("profiles")
@friendly_errors
def profiles_cmd() -> None:
    """List the model profiles and what each one locates."""
    from encoders.registry import get_profile, list_profiles

    for name in list_profiles():
        p = get_profile(name)
        typer.echo(f"{name:12s} {p.description}\n{'':12s} locates: {p.purpose}")


# In the order of the original single module, which is the order of `geoloc --help`.
app.add_typer(index.app, name="index")
app.add_typer(db.app, name="db")
app.add_typer(apikey.app, name="apikey")
app.command("locate")(locate_cmd)
app.command("eval")(eval_cmd)
app.command("calibrate")(calibrate_cmd)
app.add_typer(data.app, name="data")
app.command("train")(train_cmd)
app.add_typer(images.app, name="images")
app.add_typer(runtime.app, name="runtime")
app.command("setup")(setup_cmd)
app.command("serve")(serve_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
