"""Bad input: a short message, a non-zero exit, no traceback, and nothing on disk touched."""
import json
import os
import stat
import subprocess
import sys

import pytest

from helpers import SCHEMES, write_config
from msmodelslim.cli.__main__ import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def quant_args(model, out, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(out), "--device", "cpu", *extra]


@pytest.fixture
def w8a16_config(tmp_path):
    return write_config(tmp_path / "w8a16.yaml", SCHEMES["w8a16"])


def test_quant_and_eval_succeed(tiny_llama, tmp_path, capsys, w8a16_config):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--config_path", str(w8a16_config)))
    assert code == 0, err
    assert stat.S_IMODE(os.stat(out / "quant_model_description.json").st_mode) & 0o027 == 0
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o027 == 0
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("Debian packages are installed with apt. " * 80)
    code, stdout, err = run_cli(capsys, "eval", "--model_path", str(tiny_llama), "--quant_path", str(out),
                                "--dataset", str(eval_text), "--window", "32", "--max_windows", "3")
    assert code == 0, err
    assert "float perplexity" in stdout and "ratio quantized/float" in stdout


@pytest.mark.parametrize("case,needle", [
    ("bad_model_path", "is not a directory"),
    ("unknown_model_type", "closest: Qwen2.5-7B-Instruct"),
    ("malformed_yaml", "malformed YAML"),
    ("unsupported_pair", "no deployable kernel"),
    ("bad_device", "--device 'gpu7' is not valid"),
    ("missing_cuda", "no CUDA GPU is visible"),
    ("refused_quant_type", "--quant_type w4a4 has no practice yet"),
    ("unknown_quant_type", "--quant_type 'w3a9' is not valid"),
    ("group_size_not_dividing", "does not divide the input size 64 of layer model.layers.0.self_attn.q_proj"),
    ("wrong_family", "expects a checkpoint of type qwen3"),
    ("dp_histogram", "spec.process[0] (linear_quant) cannot run under dp_layer_wise: act.method histogram"),
    ("bad_log_level", "MSMODELSLIM_LOG_LEVEL"),
])
def test_bad_input_is_a_clear_error(tiny_llama, tmp_path, capsys, monkeypatch, w8a16_config, case, needle):
    out = tmp_path / "out"
    base = ["--model_type", "Llama-2-7B", "--config_path", str(w8a16_config)]
    if case == "bad_model_path":
        argv = quant_args(tmp_path / "nowhere", out, *base)
    elif case == "unknown_model_type":
        argv = quant_args(tiny_llama, out, "--model_type", "Qwen2.5-7B-Instruc", "--config_path", str(w8a16_config))
    elif case == "malformed_yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("apiversion: modelslim_v1\nspec: {process: [\n")
        argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--config_path", str(bad))
    elif case == "unsupported_pair":
        cfg = write_config(tmp_path / "x.yaml", {"act": SCHEMES["w8a8_dynamic"]["act"], "weight": SCHEMES["w8a16_asym_g16"]["weight"]})
        argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--config_path", str(cfg))
    elif case == "bad_device":
        argv = ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "gpu7", *base]
    elif case == "missing_cuda":
        argv = ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cuda:0", *base]
        monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    elif case == "refused_quant_type":
        argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--quant_type", "w4a4")
    elif case == "unknown_quant_type":
        argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--quant_type", "w3a9")
    elif case == "group_size_not_dividing":
        weight = {**SCHEMES["w4a16_g16"]["weight"], "ext": {"group_size": 48}}
        cfg = write_config(tmp_path / "g.yaml", {"weight": weight})
        argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--config_path", str(cfg))
    elif case == "wrong_family":
        argv = quant_args(tiny_llama, out, "--model_type", "Qwen3-8B", "--config_path", str(w8a16_config))
    elif case == "dp_histogram":  # refused before any rank starts
        histogram = {**SCHEMES["w8a8_static"], "act": {**SCHEMES["w8a8_static"]["act"], "method": "histogram"}}
        cfg = write_config(tmp_path / "auto.yaml", histogram, runner="auto")
        argv = ["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cpu:0,1",
                "--model_type", "Llama-2-7B", "--config_path", str(cfg)]
    else:
        monkeypatch.setenv("MSMODELSLIM_LOG_LEVEL", "loud")
        argv = quant_args(tiny_llama, out, *base)
    code, _, err = run_cli(capsys, *argv)
    assert code != 0
    assert needle in err, err
    assert not out.exists(), "a failed run must not create the output"
    assert not list(tmp_path.glob(".out.partial-*")), "staging directory left behind"


def test_existing_output_is_never_touched_without_overwrite(tiny_llama, tmp_path, capsys, w8a16_config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = quant_args(tiny_llama, out, "--model_type", "Llama-2-7B", "--config_path", str(w8a16_config))
    code, _, err = run_cli(capsys, *argv)
    assert code == 3 and "is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    # --overwrite replaces only a previous checkpoint of ours, never a folder of other files
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 2 and "not an msmodelslim checkpoint" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    assert run_cli(capsys, *argv)[0] == 0
    first = (out / "quant_model_description.json").read_bytes()
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert (out / "quant_model_description.json").read_bytes() == first and (out / ".msmodelslim.json").exists()


def test_failure_during_quantization_leaves_previous_output_intact(tiny_llama, tmp_path, capsys, monkeypatch, w8a16_config):
    out = tmp_path / "out"
    assert run_cli(capsys, *quant_args(tiny_llama, out, "--model_type", "Llama-2-7B",
                                       "--config_path", str(w8a16_config)))[0] == 0
    (out / "old.txt").write_text("previous run")
    before = sorted(p.name for p in out.iterdir())

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr("msmodelslim.format.ascendv1.writer.AscendV1Writer.finish", crash)
    code, _, err = run_cli(capsys, *quant_args(tiny_llama, out, "--model_type", "Llama-2-7B",
                                               "--config_path", str(w8a16_config), "--overwrite"))
    assert code == 1 and "simulated crash" in err and "MSMODELSLIM_LOG_LEVEL=debug" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob(".out.*"))


def test_trust_remote_code_flag_parsing_and_default(tiny_llama, tmp_path, capsys, w8a16_config):
    base = quant_args(tiny_llama, tmp_path / "o", "--model_type", "Llama-2-7B", "--config_path", str(w8a16_config))
    with pytest.raises(SystemExit):
        main(base + ["--trust_remote_code", "yes"])
    assert "expected True or False" in capsys.readouterr().err
    code, _, _ = run_cli(capsys, *base, "--trust_remote_code", "false", "--dry_run")
    assert code == 0


def test_checkpoint_code_is_not_run_without_trust(tiny_llama, tmp_path, capsys, w8a16_config):
    remote = tmp_path / "remote"
    remote.mkdir()
    for p in tiny_llama.iterdir():
        (remote / p.name).write_bytes(p.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    config["model_type"] = "evilarch"  # an architecture transformers does not ship: only its own code could load it
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code, _, err = run_cli(capsys, *quant_args(remote, tmp_path / "out", "--model_type", "Llama-2-7B",
                                               "--config_path", str(w8a16_config)))
    assert code != 0 and "--trust_remote_code True" in err
    assert not marker.exists()


def test_dry_run_prints_plan_and_writes_nothing(tiny_llama, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"], exclude=("lm_head", "*down_proj"))
    code, stdout, _ = run_cli(capsys, *quant_args(tiny_llama, tmp_path / "out", "--model_type", "Llama-2-7B",
                                                  "--config_path", str(cfg), "--dry_run"))
    assert code == 0
    assert "W8A8_DYNAMIC   model.layers.0.self_attn.q_proj" in stdout
    assert "FLOAT          model.layers.1.mlp.down_proj" in stdout
    assert not (tmp_path / "out").exists()


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "msmodelslim.cli", "quant", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--trust_remote_code" in result.stdout and "--quant_type" in result.stdout
