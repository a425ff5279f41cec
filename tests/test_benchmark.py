"""The benchmark command runs on the tiny preset and writes every figure it prints."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_tiny_writes_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.tools.benchmark", "--preset", "tiny", "--batch", "2", "--repeats", "1"]
    cmd += ["--images", "4", "--device", "cpu", "--out", str(out), "--channels_last", "--amp", "bfloat16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["stage_ms_per_slice"]) == {"encode", "unet", "decode"}
    assert all(v > 0 for v in res["stage_ms_per_slice"].values())
    for key in ("single_step_slices_per_s", "ddim10_slices_per_s", "ddim50x25_slices_per_s"):
        assert res[key] > 0, key
    # only an ordering that load cannot flip: 1,250 network passes against one (a 10x gap flipped on a busy machine)
    assert res["single_step_slices_per_s"] > res["ddim50x25_slices_per_s"]
    assert res["end_to_end"]["masks_written"] == 4 and res["end_to_end"]["ratio_to_bare"] > 0
    assert res["end_to_end"]["seconds"] > res["end_to_end"]["startup_seconds"] > 0
    assert res["channels_last"] is True and res["machine"]["precision"].startswith("bfloat16")
    assert res["speedup_vs_ddim10"]["ideal"] > 1 and res["training"]["seconds_per_step"] > 0
    assert res["training"]["peak_rss_mb"] > 0 and res["machine"]["torch"]
    assert 0 < res["training"]["seconds_per_step_latent_cache"]
    assert "single step (bare networks)" in proc.stdout
