"""The CLI's handling of bad input: one clear line per problem, non-zero exit, no traceback;
and what a new user meets first: help pages, `geoloc locate` called the wrong way, its table
and its JSON (the same fields as the HTTP answer, one shape for one image or many)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from encoders.bluemarble import render_tile
from service.api.schemas import LocateResponse
from service.cli.main import app
from tests.hostile import scan_bomb

ROOT = Path(__file__).resolve().parents[3]
runner = CliRunner()


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def run(*args: str):
    result = runner.invoke(app, list(args), prog_name="geoloc", env={"COLUMNS": "80"})
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def bad_images(tmp_path: Path) -> list[Path]:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    pdf = tmp_path / "doc.jpg"
    pdf.write_bytes(b"%PDF-1.4\n" + b"0" * 100)
    truncated = tmp_path / "cut.jpg"
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "ok.jpg", quality=90)
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return [tmp_path / "missing.jpg", text, pdf, truncated, empty]


def test_locate_reports_each_bad_image_on_one_line(tmp_path):
    paths = bad_images(tmp_path)
    result = run("locate", *map(str, paths))
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == len(paths)
    for kind in ("file-not-found", "unsupported-media-type", "corrupt-image", "empty-image"):
        assert any(f"[{kind}]" in line for line in lines), (kind, lines)


def test_eval_lists_bad_rows_with_line_numbers(tmp_path):
    csv = tmp_path / "data.csv"
    (tmp_path / "a.jpg").write_bytes(b"x")
    csv.write_text(
        "image,lat,lon\na.jpg,10,20\na.jpg,north,20\na.jpg,95,20\nmissing.jpg,1,2\na.jpg,1\n"
    )
    result = run("eval", str(csv))
    assert result.exit_code == 2
    lines = error_lines(result)
    assert any(":3:" in line and "not numbers" in line for line in lines)
    assert any(":4:" in line and "not a valid" in line for line in lines)
    assert any(":5:" in line and "does not exist" in line for line in lines)
    assert any(":6:" in line and "columns" in line for line in lines)
    assert "4 bad rows" in lines[-1]


def test_eval_and_images_add_refuse_costly_pictures_at_once(tmp_path):
    """The decode limits hold on the batch paths too: a JPEG of 2,000 scans (seconds to
    decode) and a 500 x 1 strip are bad rows with their types, the good tiles go through."""
    (tmp_path / "bomb.jpg").write_bytes(scan_bomb(2000, 2000))
    Image.new("RGB", (500, 1), (9, 9, 9)).save(tmp_path / "strip.png")
    rows = ["image,lat,lon", "bomb.jpg,1,2", "strip.png,3,4"]
    for i in range(3):
        render_tile(10 + i, 20, 2.0, 64).save(tmp_path / f"t{i}.png")
        rows.append(f"t{i}.png,{10 + i},20")
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    assert run("index", "build", "default-bluemarble", "--res", "1").exit_code == 0
    for args in (["eval", str(table)], ["images", "add", str(table), "--name", "refs-x"]):
        t0 = time.perf_counter()
        result = run(*args)
        assert time.perf_counter() - t0 < 60, args
        assert "[too-many-scans] " in result.output and "of 2006 scans" in result.output, args
        assert "[unsupported-image-shape] " in result.output, args
        assert "is 500x1" in result.output, args


def test_eval_with_a_csv_without_the_needed_columns(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("name,x,y\na,1,2\n")
    result = run("eval", str(csv))
    assert result.exit_code == 2 and len(error_lines(result)) == 1
    assert "latitude column" in result.output


def test_eval_missing_file(tmp_path):
    result = run("eval", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2 and "no such file" in result.output


def test_index_build_with_unknown_profile_lists_the_known_ones():
    result = run("index", "build", "x", "--profile", "nope")
    assert result.exit_code == 2
    assert "bluemarble" in result.output and "geoclip" in result.output


def test_index_build_from_a_csv_with_bad_rows(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("lat,lon\n10,20\nabc,1\n91,0\n")
    result = run(
        "index",
        "build",
        "pts",
        "--profile",
        "geoclip",
        "--random-backbone",
        "--gallery",
        "csv",
        "--csv",
        str(csv),
    )
    assert result.exit_code == 2
    assert "line 3" in result.output and "line 4" in result.output


def test_index_build_list_from_a_csv_gallery(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("LAT,LON\n48.85,2.35\n35.68,139.69\n-33.87,151.21\n")
    result = run(
        "index",
        "build",
        "pts",
        "--profile",
        "geoclip",
        "--random-backbone",
        "--gallery",
        "csv",
        "--csv",
        str(csv),
    )
    assert result.exit_code == 0, result.output
    assert "published pts/" in result.output and "3 points" in result.output
    listed = run("index", "list")
    assert listed.exit_code == 0 and "pts/" in listed.output and "geoclip" in listed.output


def test_bad_bbox_and_top_k(tmp_path):
    img = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    result = run("locate", str(img), "--bbox", "1,2,3")
    assert result.exit_code == 2 and len(error_lines(result)) == 1
    result = run("locate", str(img), "--top-k", "0")
    assert result.exit_code == 2 and "top_k" in result.output


def test_eval_compares_the_int8_runtime_with_torch_image_by_image(tmp_path, monkeypatch):
    """`geoloc eval --compare` on two runs of the same images: the share of images whose
    top-1 agrees, beside both runs' accuracy (how a user checks int8 on their own photos)."""
    places = [(48.0, 2.0), (-15.0, -50.0), (35.0, 105.0), (-25.0, 135.0), (40.0, -100.0)]
    lines = ["image,lat,lon"]
    for i, (lat, lon) in enumerate(places):
        render_tile(lat, lon, 12.0, 64).save(tmp_path / f"t{i}.png")
        lines.append(f"t{i}.png,{lat},{lon}")
    csv = tmp_path / "tiles.csv"
    csv.write_text("\n".join(lines) + "\n")
    assert run("index", "build", "--res", "1").exit_code == 0
    torch_run = run("eval", str(csv), "--json", "--label", "torch")
    assert torch_run.exit_code == 0, torch_run.output
    report = tmp_path / "torch.json"
    report.write_text(torch_run.output[torch_run.output.index("{") :])
    assert json.loads(report.read_text())["image_runtime"]["runtime"] == "torch"

    monkeypatch.setenv("GEOLOC_IMAGE_RUNTIME", "onnx")
    monkeypatch.setenv("GEOLOC_IMAGE_PRECISION", "int8")
    int8 = run("eval", str(csv), "--compare", str(report))
    assert int8.exit_code == 0, int8.output
    assert "against torch: the same top-1 on" in int8.output and "(5 images)" in int8.output
    manifest = tmp_path / "data" / "runtimes" / "bluemarble" / "onnx-int8" / "manifest.json"
    assert manifest.is_file()

    # Full 8-bit weights where this CPU has VNNI, unless the export is to be portable.
    import encoders.runtime as runtime

    monkeypatch.setattr(runtime, "has_vnni", lambda: True)
    assert run("runtime", "export").exit_code == 0
    assert json.loads(manifest.read_text())["quantization"] == runtime.INT8_8BIT
    monkeypatch.setenv("GEOLOC_IMAGE_INT8_PORTABLE", "true")
    assert run("runtime", "export").exit_code == 0
    assert json.loads(manifest.read_text())["quantization"] == runtime.INT8_7BIT


def test_agreement_counts_an_image_answered_by_one_run_only():
    from service.jobs.evaluate import top1_agreement

    mine = {"answers": [{"image": "a", "top1": [1.0, 2.0]}, {"image": "b", "top1": None},
                        {"image": "a", "top1": [5.0, 5.0]}]}  # fmt: skip
    theirs = {"label": "t", "answers": [{"image": "a", "top1": [1.0, 2.0]},
              {"image": "b", "top1": [3.0, 3.0]}, {"image": "a", "top1": [9.0, 9.0]}]}  # fmt: skip
    agree = top1_agreement(mine, theirs)
    assert agree["images"] == 3 and agree["answered_by_one_only"] == 1
    assert agree["within_km"]["1"] == pytest.approx(1 / 3)


# -- help pages -------------------------------------------------------------------------------


def command_paths(command, prefix: tuple[str, ...] = ()):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from command_paths(sub, (*prefix, name))


def commands_section(text: str) -> dict[str, str]:
    """{command: its description} from a help page's command list (wrapped lines joined)."""
    lines = text.split("Commands:\n", 1)[1].splitlines()
    out: dict[str, str] = {}
    last = ""
    for line in lines:
        if not line.strip():
            break
        if line.startswith("  ") and not line.startswith("   "):
            last, _, desc = line.strip().partition(" ")
            out[last] = desc.strip()
        else:
            out[last] += " " + line.strip()
    return out


def test_every_help_page_is_clean():
    """No type label after flags (`--help <bool>`), nothing cut short with an ellipsis
    (`GEOLOC_CALIBRATION_…`), and every command list shows whole sentences."""
    paths = list(command_paths(typer.main.get_command(app)))
    assert ("locate",) in paths and ("index", "build") in paths and ("runtime", "export") in paths
    for path in paths:
        result = run(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        assert "<bool>" not in text, (path, text)
        assert "…" not in text, (path, text)
        if "Commands:\n" in text:
            for name, desc in commands_section(text).items():
                assert desc.endswith("."), (path, name, desc)
                assert not desc.endswith("..."), (path, name, desc)


@pytest.mark.parametrize("args", [["--help"], ["locate", "--help"], ["eval", "--help"]])
def test_the_installed_command_prints_clean_help(args):
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "<bool>" not in done.stdout and "…" not in done.stdout
    if args == ["--help"]:
        commands = commands_section(done.stdout)
        assert {"locate", "eval", "index", "serve"} <= set(commands)
        assert all(desc.endswith(".") and not desc.endswith("...") for desc in commands.values())
    if args == ["eval", "--help"]:
        assert "GEOLOC_CALIBRATION_KM" in done.stdout


# -- locate called the wrong way --------------------------------------------------------------


def test_locate_a_directory_says_it_is_one_and_what_to_pass(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    result = run("locate", str(folder))
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert "is a directory" in line and f"{folder / '*.jpg'}" in line, line
    assert "file-not-found" not in line and "no such file" not in line, line


def test_locate_without_input_says_what_is_needed_with_the_usage():
    result = run("locate")
    assert result.exit_code == 2
    assert "Usage: geoloc locate [OPTIONS]" in result.output
    (line,) = error_lines(result)
    assert "nothing to locate" in line and "image files" in line and "--text" in line, line
    assert "not both" not in result.output


# -- what locate prints -----------------------------------------------------------------------


@pytest.fixture
def tiles(tmp_path) -> list[str]:
    assert run("index", "build", "--res", "1").exit_code == 0
    paths = []
    for i, (lat, lon) in enumerate([(48.0, 2.0), (-15.0, -50.0)]):
        render_tile(lat, lon, 12.0, 64).save(tmp_path / f"t{i}.png")
        paths.append(str(tmp_path / f"t{i}.png"))
    return paths


def test_locate_json_has_one_shape_and_the_http_fields(tiles):
    one, two = run("locate", "--json", tiles[0]), run("locate", "--json", *tiles)
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    answers = [json.loads(one.stdout), json.loads(two.stdout)]
    for answer, inputs in zip(answers, ([tiles[0]], tiles), strict=True):
        assert list(answer) == ["results"]
        assert [item["input"] for item in answer["results"]] == inputs
        for item in answer["results"]:
            assert set(item) == {"input", "result"}
            result = item["result"]
            assert set(result) == set(LocateResponse.model_fields)
            LocateResponse.model_validate(result)
            assert result["prediction_id"] is None  # the command line records nothing
            assert result["index_version"].startswith("default-bluemarble/")
            assert result["purpose"] and result["llm"]["status"] == "skipped"


def test_locate_table_names_its_columns(tiles):
    result = run("locate", "--top-k", "3", tiles[0])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["rank", "lat", "lon"])
    assert "p(≤50 km)" in lines[header] and lines[header].rstrip().endswith("place")
    assert lines[header + 1].split()[0] == "1"
    assert "p(≤50 km): the probability that the true location is within 50 km" in result.output
