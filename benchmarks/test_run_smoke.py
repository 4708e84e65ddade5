"""benchmarks/run.py end to end in smoke mode: the report's files, fields and correctness checks."""

import json

import pytest

from benchmarks import run


def test_run_smoke_writes_json_and_markdown(tmp_path, capsys):
    assert run.main(["--smoke", "--out-dir", str(tmp_path), "--only", "gan_g_loss|mean"]) == 0
    (json_file,) = tmp_path.glob("*.json")
    (md_file,) = tmp_path.glob("*.md")
    report = json.loads(json_file.read_text())
    assert report["smoke"] and report["copy_gbs"] > 0 and report["matmul_tflops"] > 0
    assert report["tuned"].keys() == {"conv_bn_act implementation", "conv_bn_act GEMM",
                                      "conv_bn_act weight gradient"}
    assert {"torch", "triton", "device", "python"} <= report["environment"].keys()
    rows = report["rows"]
    assert {(r["family"], r["impl"]) for r in rows} == {
        (family, impl) for family in ("gan_g_loss", "bce_with_logits[mean]") for impl in ("fastgen", "eager")}
    assert all(r["ok"] and r["ms"] > 0 and r["max_rel_err"] < 1e-5 for r in rows)
    assert all(r["speedup_vs_eager"] > 0 for r in rows)
    assert "| gan_g_loss | B=64 fp32 | fastgen |" in md_file.read_text()


def test_run_smoke_conv_layer_has_the_cudnn_gemm_row(tmp_path, capsys):
    """A conv-BN layer is also timed as cuDNN's conv + fastgen's bn_act, checked like the others."""
    assert run.main(["--smoke", "--out-dir", str(tmp_path), "--only", "conv_bn_act .* fwd\\+bwd",
                     "--tag", "conv layers"]) == 0
    (json_file,) = tmp_path.glob("*-conv-layers.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["fastgen", "fastgen-cudnn-gemm", "eager"]
    assert all(r["ok"] for r in rows)


def test_run_skips_implementations(tmp_path, capsys):
    assert run.main(["--smoke", "--out-dir", str(tmp_path), "--only", "gan_g_loss", "--skip", "eager"]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fastgen"}
    with pytest.raises(SystemExit) as exit_:
        run.main(["--smoke", "--skip", "eagre"])
    assert exit_.value.code == 2 and "eagre" in capsys.readouterr().err
