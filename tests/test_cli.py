import json

import torch

from fewbits.cli import main

REQUIRED = {"task", "recipe", "calib", "metric", "size_bytes", "left_float", "seconds"}


def test_tasks_lists_them_all(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fashion-cnn", "fashion-mlp", "mobilenetv2-probe", "minilm-wordnet", "digits",
                                        "mnist1d"))


def test_quantize_a_task_writes_the_json_contract(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w8a8", "--calib", "percentile", "--json", str(path),
                 "--out", str(tmp_path / "out")]) == 0
    data = json.loads(path.read_text())
    assert REQUIRED <= set(data)
    assert data["calib"] == "percentile" and data["recipe"] == "w8a8"
    assert set(data["metric"]) == {"name", "fp32", "quantized"} and data["metric"]["name"] == "accuracy"
    assert data["lower_is_better"] is False
    assert set(data["size_bytes"]) == {"fp32", "quantized"}
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "layer_sqnr.png").is_file()
    assert "| digits" in capsys.readouterr().out


def test_quantize_report_writes_a_page_with_the_layers_and_the_parity(tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", "--task", "digits", "--small", "--report", "--out", str(out), "--onnx",
                 str(tmp_path / "d.onnx")]) == 0
    data = json.loads((out / "report_data.json").read_text())
    assert data["format"] == "fewbits.report" and data["summary"]["metric"] == "accuracy"
    assert data["layers"] and all(r["sqnr_db"] is not None for r in data["layers"] if r["format"] != "float")
    assert data["histograms"] and len(data["parity"]["simulated"]) == len(data["parity"]["deployed"])
    page = (out / "report.html").read_text()
    assert page.count("<img class=plot") == 2  # histograms and parity: a quantize run has no front or latency
    assert main(["quantize", "--task", "digits", "--small", "--report"]) == 2  # --report needs --out


def test_quantize_with_algo_reports_what_the_step_did(tmp_path):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w8a8", "--algo", "smoothquant", "--json", str(path),
                 "--save", str(tmp_path / "digits.fewbits")]) == 0
    data = json.loads(path.read_text())
    algorithms = data["algorithms"]
    import fewbits

    packed = fewbits.load(data["saved"]["path"])
    assert packed.meta["applied"][0]["step"]["name"] == "smoothquant"
    # --algo adds to the recipe's own steps: w8a8 corrects the biases of the digits CNN's convolutions
    assert [a["step"]["name"] for a in algorithms] == ["smoothquant", "bc"]
    assert algorithms[0]["step"]["alpha"] == 0.5 and list(algorithms[0]["layers"]) == ["8"]  # its linear layer
    assert algorithms[1]["step"]["types"] == ["Conv1d", "Conv2d", "Conv3d"] and list(algorithms[1]["layers"]) == ["0", "3"]


def test_quantize_with_cle_then_bias_correction(tmp_path):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w8a8", "--algo", "cle,bc", "--json", str(path)]) == 0
    algorithms = json.loads(path.read_text())["algorithms"]
    assert [a["step"]["name"] for a in algorithms] == ["cle", "bc"]
    assert any("→" in k for k in algorithms[0]["layers"])  # the digits MLP's linear pairs


def test_quantize_with_gptq_reports_the_error_per_layer(tmp_path):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w4a8", "--algo", "gptq", "--json", str(path)]) == 0
    (gptq,) = json.loads(path.read_text())["algorithms"]
    assert gptq["step"]["name"] == "gptq" and gptq["layers"]
    assert all(v["error_gptq"] <= v["error_nearest"] for v in gptq["layers"].values())


def test_quantize_onnx_exports_verifies_and_reports(tmp_path, capsys):
    path, onnx_path = tmp_path / "r.json", tmp_path / "digits.onnx"
    assert main(["quantize", "--task", "digits", "--recipe", "w8a8", "--json", str(path), "--onnx", str(onnx_path),
                 "--strict"]) == 0
    data = json.loads(path.read_text())["onnx"]
    assert onnx_path.is_file() and data["bytes"] == onnx_path.stat().st_size
    assert data["verification"]["ok"] and data["modes"] == {"int8": len(data["layers"])}
    assert {"profile", "profile_note", "narrowed", "layers", "inputs", "outputs"} <= set(data)
    assert "ONNX export" in capsys.readouterr().out


MODEL_FILE = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
'''


def test_quantize_a_user_model(tmp_path):
    (tmp_path / "mymodel.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("m", tmp_path / "mymodel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), tmp_path / "ckpt.pt")
    torch.save(torch.randn(64, 1, 8, 8), tmp_path / "calib.pt")
    torch.save({"x": torch.randn(32, 1, 8, 8), "y": torch.randint(0, 3, (32,))}, tmp_path / "eval.pt")
    out = tmp_path / "r.json"
    assert main(["quantize", "--model", f"{tmp_path / 'mymodel.py'}:build", "--checkpoint", str(tmp_path / "ckpt.pt"),
                 "--calib-data", str(tmp_path / "calib.pt"), "--eval-data", str(tmp_path / "eval.pt"),
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["task"] == "mymodel" and data["metric"]["name"] == "accuracy"
    assert data["left_float"] == []  # the BatchNorm was folded


def test_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["quantize", "--task", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fewbits: error: unknown task 'nope'; tasks: fashion-cnn, fashion-mlp, mobilenetv2-probe, minilm-wordnet, smollm2, digits, mnist1d"]
    assert main(["quantize", "--task", "digits", "--recipe", "w9a9"]) == 2
    assert "unknown recipe 'w9a9'" in capsys.readouterr().err
    assert main(["quantize", "--task", "digits", "--exclude", "0,classifer*"]) == 2
    assert "--exclude classifer*: no layer of the model has that name" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path / "x.py") + ":f", "--calib-data", "c.pt"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["quantize", "--task", "digits", "--calib", "kl"]) == 2
    assert "calibration method must be one of" in capsys.readouterr().err
    assert main(["quantize", "--task", "digits", "--algo", "smoothquant,gptx"]) == 2
    assert "unknown step 'gptx'; known: ['adaround', 'awq', 'bc', 'cle', 'gptq', 'smoothquant', 'stochastic']" in capsys.readouterr().err
    assert main(["quantize", "--task", "digits", "--algo", "bc,cle"]) == 2
    assert "'bc' corrects the biases for the weights as they are, so it must come after ['cle']" in capsys.readouterr().err
    assert main(["quantize", "--task", "digits", "--algo", "smoothquant,smoothquant"]) == 2
    assert "more than once" in capsys.readouterr().err
    # unreadable files: one line naming the file and the option, no unpickling traceback
    (tmp_path / "mymodel.py").write_text(MODEL_FILE)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a torch file")
    torch.save(torch.randn(8, 1, 8, 8), tmp_path / "calib.pt")
    for option, files in (("--calib-data", [str(corrupt)]), ("--checkpoint", [str(tmp_path / "calib.pt"), str(corrupt)])):
        args = ["quantize", "--model", f"{tmp_path / 'mymodel.py'}:build", "--calib-data", files[0]]
        if option == "--checkpoint":
            args += ["--checkpoint", files[1]]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fewbits: error: {option}: {corrupt} is not a readable torch file"), err


def test_demo_runs_and_prints_one_table(tmp_path, capsys):
    assert main(["demo", "--tasks", "digits", "--small", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "what quantization cost" in out and out.count("| digits") == 7
    assert (tmp_path / "demo.json").is_file() and (tmp_path / "layer_sqnr.png").is_file()


def test_train_writes_the_quantize_contract_plus_training(tmp_path, capsys):
    path = tmp_path / "t.json"
    assert main(["train", "--task", "digits", "--recipe", "w4a8", "--epochs", "2", "--method", "lsq", "--distill",
                 "--lr", "1e-3", "--batch-size", "64", "--json", str(path), "--out", str(tmp_path / "out")]) == 0
    data = json.loads(path.read_text())
    assert REQUIRED <= set(data) and data["recipe"] == "w4a8"
    training = data["training"]
    assert training["method"] == "lsq" and training["distill"] == "kl" and training["ranks"] == 1
    assert len(training["history"]) == 2 and training["best_epoch"] in (1, 2) and training["seconds"] > 0
    assert data["metric"]["quantized"] == training["best"]["accuracy"]  # the kept epoch is what was evaluated
    import fewbits

    loaded = fewbits.load(tmp_path / "out" / "model.safetensors")
    assert loaded.meta["recipe"]["name"] == "w4a8"
    assert "| digits" in capsys.readouterr().out


def test_train_progressive_and_errors(tmp_path, capsys):
    path = tmp_path / "t.json"
    assert main(["train", "--task", "digits", "--recipe", "w4a8", "--epochs", "2", "--progressive", "8,4",
                 "--batchnorm", "train", "--layer-stages", "2", "--json", str(path)]) == 0
    training = json.loads(path.read_text())["training"]
    assert training["progressive"] == "8,4" and training["batchnorm"] == "train"
    assert main(["train", "--task", "digits", "--recipe", "w4a8", "--progressive", "8,2"]) == 2
    assert "must end at one of the recipe's weight widths" in capsys.readouterr().err
    assert main(["train", "--task", "minilm-wordnet", "--small"]) == 2
    assert "no labels: it trains against the fp32 model only, add --distill" in capsys.readouterr().err


def test_torchrun_trains_data_parallel(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    path = tmp_path / "t.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "fewbits", "--threads", "1", "train", "--task",
                    "digits", "--recipe", "w8a8", "--epochs", "1", "--batch-size", "64", "--json", str(path)],
                   check=True, env=env, capture_output=True, timeout=600)
    data = json.loads(path.read_text())
    assert data["training"]["ranks"] == 2 and data["metric"]["quantized"] > 80


def test_compress_prints_stages_and_writes_the_json_contract(tmp_path, capsys):
    path, out = tmp_path / "c.json", tmp_path / "mlp.fbdc"
    assert main(["compress", "--task", "fashion-mlp", "--prune", "0.9", "--bits", "5", "--steps", "2", "--epochs", "1",
                 "--finetune-epochs", "0.25", "--train-size", "16384", "--small", "--json", str(path),
                 "--out", str(out)]) == 0
    data = json.loads(path.read_text())
    assert [s["name"] for s in data["stages"]] == ["dense", "pruned", "quantized", "huffman"]
    sizes = data["sizes"]
    assert sizes["dense"] == 4 * (784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert sizes["huffman"] == out.stat().st_size and data["ratio"] == round(sizes["dense"] / sizes["huffman"], 2)
    assert data["ratio"] > 25  # 10% of the weights at ≤ 5 bits plus coded positions, measured ≈ 39×
    accuracy = [s["metrics"]["accuracy"] for s in data["stages"]]
    assert accuracy[0] > 88 and accuracy[3] == accuracy[2] > accuracy[0] - 6  # 256 retraining steps on 16k images
    assert len(data["layers"]) == 3 and all(0 < row["density"] < 1 for row in data["layers"])
    printed = capsys.readouterr().out
    assert "| huffman" in printed and "per layer" in printed
    assert main(["compress", "--task", "minilm-wordnet", "--small"]) == 2  # no labels: a one-line error
    assert "no labelled training data" in capsys.readouterr().err


def test_quantize_with_a_non_uniform_builtin(tmp_path):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w4-kmeans", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    sizes, metric = data["size_bytes"], data["metric"]
    assert sizes["quantized"] < sizes["fp32"] / 4  # 4-bit indices plus 16 float32 levels per channel
    assert metric["quantized"] >= metric["fp32"] - 3  # 16 k-means levels per channel: close to fp32
    assert {row["weight_bits"] for row in data["layers"]} == {4}

def test_train_an_unlabelled_image_task_by_feature_distillation(tmp_path):
    path = tmp_path / "t.json"
    assert main(["train", "--task", "mobilenetv2-probe", "--recipe", "w4a8", "--distill", "--small", "--epochs", "1",
                 "--train-size", "128", "--lr", "1e-4", "--json", str(path)]) == 0
    training = json.loads(path.read_text())["training"]
    assert training["train_size"] == 128 and training["distill"] == "cosine" and len(training["history"]) == 1


def _tiny_gpt2(directory):
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return transformers


def test_quantize_a_hugging_face_directory_with_dict_inputs(tmp_path, capsys):
    _tiny_gpt2(tmp_path / "gpt2")
    ids = torch.randint(0, 120, (8, 16), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "calib.pt")
    path = tmp_path / "r.json"
    assert main(["quantize", "--hf-model", str(tmp_path / "gpt2"), "--calib-data", str(tmp_path / "calib.pt"),
                 "--batch-size", "4", "--json", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 0
    data = json.loads(path.read_text())
    assert data["task"] == "gpt2" and REQUIRED <= set(data)
    assert data["onnx"]["verification"]["ok"]
    # every projection (Conv1D → Linear) and the head on integer kernels
    assert data["onnx"]["kernels"]["share"] == 1.0 and data["onnx"]["kernels"]["integer"] == 9
    out = capsys.readouterr().out
    assert "left float" in out and "normalization stays float" in out


def test_hugging_face_calibration_text_and_errors(tmp_path, capsys):
    import pytest

    _tiny_gpt2(tmp_path / "gpt2")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *"the a cat dog sat ran on mat".split()])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "gpt2")
    (tmp_path / "text.txt").write_text("the cat sat on the mat " * 20)
    from fewbits.hf import tokenized_batches

    batches = tokenized_batches(tmp_path / "gpt2", tmp_path / "text.txt", length=8, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 8), (4, 8), (4, 8), (3, 8)]  # 120 tokens in windows of 8
    assert main(["quantize", "--hf-model", str(tmp_path / "gpt2"), "--calib-text", str(tmp_path / "text.txt"),
                 "--seq-len", "8"]) == 0
    capsys.readouterr()
    for argv, message in (
            (["--hf-model", str(tmp_path)], "is not a Hugging Face model directory (no config.json)"),
            (["--hf-model", str(tmp_path / "gpt2")], "--hf-model needs --calib-data"),
            (["--model", "m.py:f", "--calib-text", "t.txt"], "--calib-text needs --hf-model"),
            (["--task", "digits", "--hf-model", str(tmp_path / "gpt2")], "give one of --task, --model or --hf-model")):
        assert main(["quantize", *argv, *(["--calib-data", "x.pt"] if "no config" in message else [])]) == 2
        assert message in capsys.readouterr().err


def test_calibration_dicts_split_together_and_bad_ones_are_named(tmp_path):
    import pytest

    from fewbits.cli import load_batches

    torch.save({"input_ids": torch.zeros(5, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)}, tmp_path / "d.pt")
    batches = load_batches(str(tmp_path / "d.pt"), 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1] and set(batches[0]) == {"input_ids", "attention_mask"}
    torch.save({"input_ids": torch.zeros(5, 3), "attention_mask": torch.ones(4, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="differ in their first dimension"):
        load_batches(str(tmp_path / "bad.pt"), 2)


def test_exclude_keeps_the_named_layers_float_and_many_left_float_layers_are_grouped(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["quantize", "--task", "digits", "--recipe", "w4-g32", "--exclude", "8", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["recipe"] == "w4-g32 (excluding 8)"
    assert [x["name"] for x in data["left_float"]] == ["8"]  # the classifier, by its Sequential index
    assert data["left_float"][0]["reason"] == "excluded by the recipe"
    from fewbits.cli import left_float_rows
    from fewbits.wrap.handle import LeftFloat

    many = [LeftFloat(f"layers.{i}.norm", "LlamaRMSNorm", "normalization stays float") for i in range(20)]
    rows = left_float_rows(many + [LeftFloat("lm_head", "Linear", "excluded by the recipe")])
    assert [r["left float"] for r in rows] == ["20 layer(s): layers.0.norm, layers.1.norm …", "1 layer(s): lm_head"]
