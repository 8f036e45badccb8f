"""The `geoloc` command line: build and list indexes, locate images, evaluate.

One module per command or group of commands; this one builds the root app from them. Command
modules import only typer and the standard library at their top, so `geoloc --help` and the
commands that need no model (profiles, index list, db, apikey) start without torch or faiss.
"""

from __future__ import annotations

import inspect
import re

import typer

from service.cli import apikey, data, db, images, index, runtime
from service.cli.common import friendly_errors
from service.cli.eval import calibrate_cmd, eval_cmd
from service.cli.locate import locate_cmd
from service.cli.serve import serve_cmd
from service.cli.setup import setup_cmd
from service.cli.train import train_cmd

# Plain help pages (click's formatter, not rich's panels): no type label after every flag,
# help text and defaults wrapped at word boundaries, never cut short with an ellipsis.
app = typer.Typer(
    help="geoloc: image geolocation (retrieval over a GPS gallery).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.command("profiles")
@friendly_errors
def profiles_cmd() -> None:
    """List the model profiles and what each one locates."""
    from encoders.registry import get_profile, list_profiles

    for name in list_profiles():
        p = get_profile(name)
        typer.echo(f"{name:12s} {p.description}\n{'':12s} locates: {p.purpose}")


# In the order of the original single module, which is the order of `geoloc --help`. Each
# command's line there is one whole sentence (short_help), the details are in its own --help.
app.add_typer(index.app, name="index", short_help="Build and list gallery indexes.")
app.add_typer(db.app, name="db", short_help="Upgrade or inspect the database schema.")
app.add_typer(apikey.app, name="apikey", short_help="Create, list and revoke API keys.")
app.command("locate", short_help="Locate image files, or a description of a place with --text.")(
    locate_cmd
)
app.command("eval", short_help="Measure accuracy and calibration on labelled images.")(eval_cmd)
app.command("calibrate", short_help="Fit calibrated probabilities and the localizability verdict.")(
    calibrate_cmd
)
app.add_typer(data.app, name="data", short_help="Make labelled image sets.")
app.command("train", short_help="Train the image-GPS alignment on geotagged images.")(train_cmd)
app.add_typer(images.app, name="images", short_help="Manage reference images with known GPS.")
app.add_typer(runtime.app, name="runtime", short_help="Export the image tower for ONNX Runtime.")
app.command("setup", short_help="Build everything the default service needs, once.")(setup_cmd)
app.command("serve", short_help="Serve the HTTP API.")(serve_cmd)


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`])", paragraph)[0]


def whole_sentence_short_help(typer_app: typer.Typer) -> None:
    """Every command without a short help gets the first sentence of its docstring, so the
    command lists of `geoloc ... --help` show whole sentences (click cuts long help at about
    45 characters with '...')."""
    for command in typer_app.registered_commands:
        doc = command.help or inspect.getdoc(command.callback) or ""
        if command.short_help is None and doc:
            command.short_help = first_sentence(doc)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            whole_sentence_short_help(group.typer_instance)


whole_sentence_short_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
