"""Hub-tagged backbone weights (geoclip's ViT-L-14 / openai) on a machine without the hub.

huggingface_hub reads its endpoint and cache at import, so each case runs in a fresh
interpreter with HF_ENDPOINT on a closed loopback port. Without the pre-check, open_clip's
download retried for about a minute (twice: safetensors, then .bin) before any error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLOSED = "http://127.0.0.1:9"
REPO = "timm/vit_large_patch14_clip_224.openai"

#: Times create_backbone alone (torch and open_clip imported before the clock starts).
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import open_clip, torch
    from encoders import image

    got = {}
    if sys.argv[1] == "fake-build":
        def fake(architecture, pretrained, device):
            cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
            got["path"] = open_clip.pretrained.download_pretrained(cfg)
            model = torch.nn.Module()
            model.visual = torch.nn.Identity()
            return model, None, None
        open_clip.create_model_and_transforms = fake
    t0 = time.perf_counter()
    try:
        image.create_backbone("ViT-L-14", "openai")
    except Exception as exc:
        got["error"] = f"{type(exc).__name__}: {exc}"
    got["seconds"] = time.perf_counter() - t0
    print("@@" + json.dumps(got))
    """
)


def run(tmp_path: Path, mode: str) -> tuple[dict, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": CLOSED,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    out, _, tail = done.stdout.rpartition("@@")
    assert tail, done.stdout + done.stderr
    return json.loads(tail), out + done.stderr


def test_missing_hub_weights_fail_at_once_with_the_advice_once(tmp_path):
    got, output = run(tmp_path, "real")
    assert got["seconds"] < 10, got
    error = got["error"]
    assert error.startswith("WeightsNotFoundError: "), error
    assert "not in the cache" in error and CLOSED in error and "may be offline" in error
    assert error.count("GEOLOC_BACKBONE_CHECKPOINT") == 1
    assert "open_clip.create_model('ViT-L-14', pretrained='openai')" in error
    assert ".." not in error.replace("...", "")
    assert "Retry" not in output and "Retrying" not in error


def test_cached_hub_weights_are_read_without_asking_the_hub(tmp_path):
    """The .bin in the Hugging Face cache is what open_clip gets, with no request at all
    (the safetensors alternative it tries first is not cached: no retries for it either)."""
    snapshot = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    got, output = run(tmp_path, "fake-build")
    assert "error" not in got, got
    assert Path(got["path"]).resolve() == weights.resolve()
    assert got["seconds"] < 10, got
    assert "Retry" not in output
