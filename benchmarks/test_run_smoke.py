"""benchmarks/run.py end to end in smoke mode: the report's files, fields and correctness checks."""

import functools
import json
import time

import pytest
import torch

from benchmarks import run
from benchmarks.cases import all_cases, check, make_step


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


def test_scaling_row_joins_the_report(tmp_path, capsys):
    """--scaling adds the data-parallel row to the JSON and a table to the markdown (here, without
    CUDA, as skipped with its reason)."""
    assert run.main(["--smoke", "--out-dir", str(tmp_path), "--only", "gan_g_loss", "--scaling"]) == 0
    (json_file,) = tmp_path.glob("*.json")
    assert json.loads(json_file.read_text())["scaling"] == {"row": "ddp-scaling", "skipped": "no CUDA device"}
    (md_file,) = tmp_path.glob("*.md")
    assert "| ddp-scaling | skipped: no CUDA device |" in md_file.read_text()


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


def test_every_implementation_returns_the_same_outputs():
    """No row can win by dropping work: the GAN losses' logging means D(x), D(G(z)) are outputs of
    every implementation (the eager baselines used to compute and discard them, and torch.compile
    removed that work from its rows only), checked against the reference like the loss."""
    cpu = torch.device("cpu")
    for case in [c for c in all_cases(smoke=True) if c.family in ("gan_d_loss", "gan_g_loss")]:
        inputs = case.make_inputs(cpu)
        outputs = {impl: make_step(case, impl, inputs)() for impl in ("fastgen", "eager")}
        means = 2 if case.family == "gan_d_loss" else 1
        assert len(outputs["eager"]) == len(outputs["fastgen"]) == 1 + means + len(inputs)
        for impl, out in outputs.items():
            assert check(case, inputs, out) < 1e-5, impl
            assert all(0 < m.item() < 1 for m in out[1:1 + means]), impl


def test_warm_makes_each_first_call_and_writes_no_report(tmp_path, capsys):
    assert run.main(["--smoke", "--warm", "--out-dir", str(tmp_path), "--only", "gan_g_loss"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["family"], r["impl"]) for r in lines] == [("gan_g_loss", "fastgen"), ("gan_g_loss", "eager")]
    assert all(r["first_call_s"] > 0 for r in lines) and not list(tmp_path.iterdir())


def test_a_row_past_its_limit_is_reported_not_fatal(monkeypatch):
    with pytest.raises(run.RowTimeout), run.time_limit(0.05):
        time.sleep(2)
    (case,) = [c for c in all_cases(smoke=True) if c.family == "gan_g_loss"]
    monkeypatch.setattr(run, "check", lambda *args: time.sleep(2))
    rows = run.run_case(case, ("fastgen", "eager"), torch.device("cpu"), False, 1.0, 1.0, row_limit_s=0.3)
    assert [r["error"].split(":")[0] for r in rows] == ["RowTimeout", "RowTimeout"]
    assert all(not r["ok"] and r["row_s"] < 1.5 for r in rows)


@pytest.mark.parametrize("argv, message", [(["--with", "fp64"], "--with: unknown ['fp64']"),
                                           (["--impls", "fastgne"], "--impls: unknown implementations")])
def test_bad_options_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--smoke", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_compiled_rows_trace_and_match(monkeypatch):
    """The torch.compile rows of whole models and the training step (aot_eager on the CPU, for
    speed): fastgen's own D inside torch.compile (its conv ops graph-break or are library ops,
    either way) and the compiled PyTorch step match the float64 reference."""
    from benchmarks import cases

    monkeypatch.setattr(cases.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    smoke = {c.group: c for c in all_cases(smoke=True)}
    for group, impl in (("dcgan64 D B=2 fp32", "fastgen-compile"), ("dcgan64 D B=2 fp32", "compile"),
                        ("train DCGAN16 step B=2 fp32", "compile")):
        torch._dynamo.reset()
        case = smoke[group]
        inputs = case.make_inputs(torch.device("cpu"))
        assert check(case, inputs, make_step(case, impl, inputs)()) < 1e-5, (group, impl)
